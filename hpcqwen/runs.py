"""From what a user types (a job id or a run dir) to the run dir, its jobs and their states.

Jobs run with `--chdir=RUN_DIR`, so squeue's %Z and sacct's WorkDir lead from a job id back
to its run dir; a run dir's manifest leads to its job ids.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcqwen import slurm
from hpcqwen.backends import local_status
from hpcqwen.errors import RunDirError
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.paths import RunPaths, is_run_dir
from hpcqwen.submit import read_manifest


@dataclass(frozen=True)
class RunRef:
    """A run dir and/or a job, as far as they could be found."""

    run_dir: Path | None
    job_id: str  # the whole job (array id for arrays)
    backend: str  # slurm | submitit | local
    array_task: int | None = None  # set when the user named one task (123_4)
    array_size: int | None = None


def resolve_target(text: str, run: slurm.RunCmd = slurm.run_cmd) -> RunRef:
    """A run dir path or a job id (123, 123_4) -> RunRef."""
    path = Path(text).expanduser()
    if is_run_dir(path):
        info = read_manifest(path.resolve())
        jobs = info.get("job_ids") or []
        if not jobs:
            raise RunDirError(f"{path} was never submitted (its manifest lists no job id)",
                              hint="submit the spec again with `hpcqwen submit`")
        return RunRef(path.resolve(), str(jobs[0]), info.get("backend", "slurm"), None, info.get("array_size"))
    if JOB_ID_RE.fullmatch(text):
        job, _, task = text.partition("_")
        rows = slurm.query_jobs([job], run=run)[job]
        work = next((r.work_dir for r in rows if r.work_dir), "")
        run_dir = Path(work) if work and is_run_dir(work) else None
        size = read_manifest(run_dir).get("array_size") if run_dir else None
        return RunRef(run_dir, job, "slurm", int(task) if task else None, size)
    raise RunDirError(f"{text!r} is neither a run dir nor a Slurm job id",
                      hint="give the run dir that `hpcqwen submit` printed, or a job id such as 123 or 123_4")


def job_rows(ref: RunRef, run: slurm.RunCmd = slurm.run_cmd) -> list[slurm.JobRow]:
    """Current rows of the job (one per array task); sacct fills in tasks that left the queue."""
    if ref.backend == "local":
        state = local_status(RunPaths(ref.run_dir), ref.job_id) if ref.run_dir else "UNKNOWN"
        return [slurm.JobRow(ref.job_id, ref.job_id, None, state, "", "local", source="local")]
    rows = slurm.query_jobs([ref.job_id], run=run)[ref.job_id]
    if ref.array_size and len({r.array_task_id for r in rows}) < ref.array_size and rows[0].source == "squeue":
        seen = {r.array_task_id for r in rows}
        rows += [r for r in slurm.sacct([ref.job_id], run=run) if r.array_task_id not in seen]
    if ref.array_task is not None:
        rows = [r for r in rows if r.array_task_id == ref.array_task]
    return sorted(rows, key=lambda r: (r.array_task_id is None, r.array_task_id or 0))


def is_finished(ref: RunRef, rows: list[slurm.JobRow]) -> bool:
    """Every task is in a terminal state (and, for arrays, every task was seen)."""
    if not rows:
        return False
    if ref.array_size and ref.array_task is None and len(rows) < ref.array_size:
        return False
    return all(r.state.is_terminal for r in rows)


def wait_for(ref: RunRef, run: slurm.RunCmd = slurm.run_cmd, first_poll_s: float = 1.0, max_poll_s: float = 15.0,
             on_change: Callable[[list[slurm.JobRow]], None] | None = None) -> list[slurm.JobRow]:
    """Poll (one squeue call each time, backing off) until the job is finished."""
    delay, last = first_poll_s, None
    while True:
        rows = job_rows(ref, run=run)
        summary = [(r.job_id, r.slurm_state) for r in rows]
        if on_change and summary != last:
            on_change(rows)
            last = summary
        if is_finished(ref, rows):
            return rows
        time.sleep(delay)
        delay = min(max_poll_s, delay * 1.5)


def log_files(ref: RunRef) -> list[Path]:
    """Log files of the job (of the named array task when there is one), oldest first."""
    if ref.run_dir is None:
        raise RunDirError(f"job {ref.job_id} has no hpcqwen run dir that could be found",
                          hint="give the run dir instead of the job id")
    logs = RunPaths(ref.run_dir).logs
    files = sorted((p for p in logs.glob("*.out")), key=lambda p: p.stat().st_mtime)
    if ref.array_task is not None:
        files = [p for p in files if p.stem.endswith(f"_{ref.array_task}")]
    return files


def failure_excerpt(text: str, lines: int = 15) -> list[str]:
    """The lines of a log that explain a failure: the first error and what led to it, else the tail.

    torchrun ends a failed run with a long footer of its own; the root cause is the first
    exception (or hpcqwen `error[...]`) printed by a rank.
    """
    all_lines = text.splitlines()
    for i, line in enumerate(all_lines):
        if re.match(r"^(error\[|[\w.]*(Error|Exception)\b.*:)", line.strip()):
            return all_lines[max(0, i - lines + 3): i + 3]
    return all_lines[-lines:]
