"""`task.kind: command` — run any Python module under the launcher (torchrun when distributed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from hpcqwen.fields import SPEC_CONFIG

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView


class CommandTask(BaseModel):
    """Run `python -m <module> <args>` on every process; `HPCQWEN_RUN_DIR` points at the run dir."""

    model_config = SPEC_CONFIG
    kind: Literal["command"] = "command"
    module: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
        description="Python module to run, e.g. hpcqwen.examples.allreduce.",
    )
    args: list[str] = Field(default_factory=list, description="Arguments after the module name.")

    def runner_module(self) -> str:
        """The module the launcher starts on every process."""
        return self.module

    def runner_args(self, run_dir: str) -> list[str]:
        """Arguments given to the module."""
        return list(self.args)

    def check(self, spec: SpecView) -> list[Problem]:
        """Cross-field checks against the whole spec (none for a plain command)."""
        return []
