"""`hpcqwen hangs JOB|RUN_DIR`: the hang reports the watchdog wrote for a run (newest last)."""

from __future__ import annotations

import argparse
import json

from hpcqwen import runs
from hpcqwen.cli._common import add_target_argument
from hpcqwen.errors import EXIT_OK, RunDirError
from hpcqwen.hangreport import list_reports
from hpcqwen.paths import RunPaths


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET [--json]."""
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """List every task's reports: when, what, the suspect, what was done, and the file."""
    ref = runs.resolve_target(args.target)
    if ref.run_dir is None:
        raise RunDirError(f"job {ref.job_id} has no hpcqwen run dir that could be found",
                          hint="give the run dir instead of the job id")
    paths = RunPaths(ref.run_dir)
    tasks = paths.task_dirs(ref.array_size)
    found = [(i if ref.array_size else None, r) for i, t in enumerate(tasks) for r in list_reports(t.hangs)]
    if args.json:
        print(json.dumps([{"task": i, "report": str(r.path), "title": r.title, "suspect": r.suspect,
                           "action": r.action} for i, r in found], indent=2))
        return EXIT_OK
    if not found:
        print(f"no hang reports in {ref.run_dir} (the watchdog found no hang)")
        return EXIT_OK
    for i, r in found:
        task = f"task {i}: " if i is not None else ""
        print(f"{r.path}\n  {task}{r.title}\n  suspect: {r.suspect}\n  action:  {r.action}")
    return EXIT_OK
