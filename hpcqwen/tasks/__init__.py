"""Task models: one per `task.kind`, a tagged union on `kind`.

Each model knows the module the launcher runs (`runner_module()`), its arguments
(`runner_args(run_dir)`) and its cross-field checks against the whole spec (`check(spec)`).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from hpcqwen.tasks.command import CommandTask
from hpcqwen.tasks.sft import SftTask

TaskSpec = Annotated[Union[CommandTask, SftTask], Field(discriminator="kind")]  # noqa: UP007

TASK_KINDS: dict[str, type] = {"command": CommandTask, "sft": SftTask}

__all__ = ["TASK_KINDS", "CommandTask", "SftTask", "TaskSpec"]
