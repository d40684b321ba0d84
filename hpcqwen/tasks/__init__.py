"""Task models: one per `task.kind`, a tagged union on `kind`.

Each model knows the module the launcher runs (`runner_module()`), its arguments
(`runner_args(run_dir)`) and its cross-field checks against the whole spec (`check(spec)`); the
training tasks also name settings that are valid but do nothing (`warnings(spec)`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field, TypeAdapter

from hpcqwen.tasks.command import CommandTask
from hpcqwen.tasks.distill import DistillTask
from hpcqwen.tasks.grpo import GrpoTask
from hpcqwen.tasks.megatron import MegatronTask
from hpcqwen.tasks.sft import SftTask

# Sorted by kind: pydantic lists the tags in this order in "unknown task kind" errors.
TaskSpec = Annotated[Union[CommandTask, DistillTask, GrpoTask, MegatronTask, SftTask],  # noqa: UP007
                     Field(discriminator="kind")]

TASK_ADAPTER: TypeAdapter[TaskSpec] = TypeAdapter(TaskSpec)
"""Validates one raw task mapping (the spec's, an array task's, a sweep value's)."""

TASK_KINDS: dict[str, type] = {"command": CommandTask, "sft": SftTask, "grpo": GrpoTask, "distill": DistillTask,
                               "megatron": MegatronTask}

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView


def spec_warnings(spec: SpecView) -> list[Problem]:
    """What `hpcqwen submit` prints to stderr as warnings (never errors) for this spec's task."""
    return spec.task.warnings(spec) if isinstance(spec.task, (SftTask, MegatronTask)) else []


__all__ = ["TASK_ADAPTER", "TASK_KINDS", "CommandTask", "DistillTask", "GrpoTask", "MegatronTask", "SftTask",
           "TaskSpec", "spec_warnings"]
