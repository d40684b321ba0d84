"""`hpcqwen cancel JOB|RUN_DIR`: scancel (or stop a local run).

Either way the ranks get SIGTERM, save a complete checkpoint and stop (Slurm's KillWait, or the
partition's GraceTime, bounds the time they have); the state is CANCELLED and the run can be
continued with `hpcqwen resume RUN_DIR`. A job that already ended, or that Slurm no longer knows, is
not cancelled (scancel of a forgotten id prints nothing and exits 0: "cancelled" would be a lie).
"""

from __future__ import annotations

import argparse
import os
import signal

from hpcqwen import runs, slurm
from hpcqwen.cli._common import add_target_argument
from hpcqwen.paths import RunPaths
from hpcqwen.rundir import local_process


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET."""
    add_target_argument(p)


def _ended(ref: runs.RunRef, rows: list[slurm.JobRow]) -> str:
    """Why there is nothing to cancel ('' when there is something)."""
    runs.check_known(ref, rows)
    if runs.is_forgotten(rows):
        return rows[0].reason
    if runs.is_finished(ref, rows):
        return "it ended " + ", ".join(sorted({r.slurm_state for r in rows}))
    return ""


def run(args: argparse.Namespace) -> int:
    """Cancel the whole job (or the one array task named as 123_4)."""
    ref = runs.resolve_target(args.target)
    name = ref.job_id + (f"_{ref.array_task}" if ref.array_task is not None else "")
    if ref.backend == "local":
        # finished (its exit code is written even if localrun lives a moment longer), or its pid now
        # belongs to another program: signal nothing
        ended = ref.run_dir is None or RunPaths(ref.run_dir).local_rc.exists()
        pid = None if ended else local_process(ref.job_id, ref.run_dir)  # type: ignore[arg-type]
        if pid is None:
            print(f"{ref.job_id} is not running")
            return 0
        RunPaths(ref.run_dir).local_cancelled.touch()  # type: ignore[arg-type]
        os.killpg(pid, signal.SIGTERM)  # localrun, the launcher and the ranks: one process group
    else:
        why = _ended(ref, runs.job_rows(ref))
        if why:
            print(f"job {name}: nothing to cancel ({why})")
            return 0
        slurm.scancel([name])
    print(f"cancelled {name}")
    return 0
