"""Trivial helpers every runner uses: the frozen spec of this process, ranks, errors on the node."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen.errors import HpcqwenError
from hpcqwen.paths import RunPaths, TaskPaths
from hpcqwen.spec import JobSpec, read_frozen_spec


@dataclass(frozen=True)
class RunContext:
    """What a runner needs to know about where it runs."""

    spec: JobSpec
    task: Any  # the task model of this array index
    paths: RunPaths
    task_paths: TaskPaths
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_rank0(self) -> bool:
        """Global rank 0 (writes metrics and markers)."""
        return self.rank == 0


def load_context(run_dir: str) -> RunContext:
    """Read spec.json and the launcher's environment (HPCQWEN_*, torchrun's RANK/WORLD_SIZE)."""
    paths = RunPaths(Path(run_dir))
    spec = read_frozen_spec(paths.spec_json)
    index = os.environ.get("HPCQWEN_ARRAY_TASK_ID") or None
    array_index = int(index) if index is not None else None
    task_dir = os.environ.get("HPCQWEN_TASK_DIR")
    task_paths = TaskPaths(Path(task_dir)) if task_dir else paths.task(array_index)
    return RunContext(spec, spec.task_for(array_index), paths, task_paths, int(os.environ.get("RANK", "0")),
                      int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def log0(ctx: RunContext, message: str) -> None:
    """Print once (rank 0), flushed, so the Slurm log shows it at once."""
    if ctx.is_rank0:
        print(message, flush=True)


def run_main(main: Callable[[str], int | None]) -> None:
    """`if __name__ == "__main__"` body: run, and turn user errors into one clear message."""
    try:
        code = main(sys.argv[1])
    except HpcqwenError as e:
        print(e.render(), file=sys.stderr, flush=True)
        code = e.exit_code
    except Exception:
        traceback.print_exc()
        code = 1
    sys.exit(code or 0)
