"""Each step is logged once across restarts: rank 0 drops metrics lines of steps that run again, after a resume
from a checkpoint and after a crash before the first complete checkpoint (a fresh start)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hpcqwen import checkpoints
from hpcqwen.paths import TaskPaths
from hpcqwen.runners._shared import resume_point


def _ctx(task_dir: Path) -> Any:
    return SimpleNamespace(task_paths=TaskPaths(task_dir), is_rank0=True)


def _log(path: Path, steps: range) -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "phase": "train"}) + "\n" for s in steps))


def test_a_crash_before_the_first_checkpoint_drops_every_logged_step(tmp_path: Path) -> None:
    task = TaskPaths(tmp_path)
    _log(task.metrics, range(1, 6))  # steps 1..5 logged, then killed inside the first save
    (task.checkpoints / "checkpoint-5").mkdir(parents=True)  # the torn save: no marker
    assert resume_point(_ctx(tmp_path), task.checkpoints) is None
    assert task.metrics.read_text() == ""  # the fresh start logs steps 1..5 again, once


def test_a_resume_drops_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    task = TaskPaths(tmp_path)
    _log(task.metrics, range(1, 9))
    ckpt = task.checkpoints / "checkpoint-5"
    ckpt.mkdir(parents=True)
    checkpoints.mark_complete(ckpt)
    assert resume_point(_ctx(tmp_path), task.checkpoints) == ckpt
    assert [json.loads(x)["step"] for x in task.metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
