"""`hpcqwen logs JOB|RUN_DIR [-f]`: print the log; follow it by byte offset (NFS-safe, no inotify)
until the job ends, or until Slurm has forgotten it and its log stopped growing."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hpcqwen import runs
from hpcqwen.cli._common import add_target_argument
from hpcqwen.errors import RunDirError

FORGOTTEN_POLLS = 3  # polls in a row with the job unknown to Slurm and no new log bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET [-f] [--task N]."""
    add_target_argument(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--task", type=int, default=None, help="array task index (default: the job's or task 0)")


def copy_from(path: Path, offset: int) -> int:
    """Print what was appended since `offset`; return the new offset (restarts at 0 if truncated)."""
    text, offset = runs.read_new(path, offset)
    sys.stdout.write(text)
    sys.stdout.flush()
    return offset


def run(args: argparse.Namespace) -> int:
    """Print the log once, or follow it across requeues (append mode keeps one file)."""
    ref = runs.resolve_target(args.target)
    if args.task is not None:
        ref = runs.RunRef(ref.run_dir, ref.job_id, ref.backend, args.task, ref.array_size)
    elif ref.array_size and ref.array_task is None:
        ref = runs.RunRef(ref.run_dir, ref.job_id, ref.backend, 0, ref.array_size)
    path, offset, delay, quiet = runs.pick_log(ref), 0, 0.5, 0
    if path is None and not args.follow:
        raise RunDirError(f"no log yet for job {ref.job_id}", where=str(ref.run_dir),
                          hint="the job may still be pending; try `hpcqwen logs -f`")
    while True:
        path = path or runs.pick_log(ref)
        before = offset
        if path is not None:
            offset = copy_from(path, offset)
        if not args.follow:
            return 0
        rows = runs.job_rows(ref)
        if runs.is_finished(ref, rows):
            if path is not None:
                copy_from(path, offset)
            return 0
        # Slurm forgot the job (past MinJobAge, no accounting): it will never say it ended, so stop
        # once the log has not grown for a few polls (a requeued job is known to squeue again).
        quiet = quiet + 1 if runs.is_forgotten(rows) and offset == before else 0
        if quiet >= FORGOTTEN_POLLS:
            print(f"hpcqwen logs: {rows[0].reason.replace('this job', f'job {ref.job_id}')}, and its log stopped "
                  "growing; stopped following", file=sys.stderr)
            return 0
        time.sleep(delay)
        delay = min(5.0, delay * 1.5)
