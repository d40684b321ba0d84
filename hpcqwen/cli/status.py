"""`hpcqwen status JOB|RUN_DIR`: state of every task, the run dir and its log."""

from __future__ import annotations

import argparse
import json

from hpcqwen import runs, slurm
from hpcqwen.cli._common import add_target_argument
from hpcqwen.hangreport import list_reports
from hpcqwen.paths import RunPaths
from hpcqwen.progress import final_of, restarts_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET [--json]."""
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def restarts(ref: runs.RunRef) -> int:
    """Restarts recorded by the launchers (each task's launches.jsonl): the most of any task."""
    if ref.run_dir is None:
        return 0
    return max(restarts_of(ref.run_dir, ref.array_size).values(), default=0)


def hang_reports(ref: runs.RunRef) -> list[str]:
    """The newest hang report of each task (the watchdog's report.md), if any."""
    if ref.run_dir is None:
        return []
    found = (list_reports(t.hangs) for t in RunPaths(ref.run_dir).task_dirs(ref.array_size))
    return [str(reports[-1].path) for reports in found if reports]


def run(args: argparse.Namespace) -> int:
    """Print the state (exit 0 whatever the state; the state is data, not an error)."""
    ref = runs.resolve_target(args.target)
    rows = runs.job_rows(ref)
    runs.check_known(ref, rows)
    paths = RunPaths(ref.run_dir) if ref.run_dir else None

    def final(r: slurm.JobRow) -> str:
        return final_of(paths.task(r.array_task_id if ref.array_size else None).dir) if paths else ""
    if args.json:
        print(json.dumps({"job_id": ref.job_id, "run_dir": str(ref.run_dir) if ref.run_dir else None,
                          "backend": ref.backend, "restarts": restarts(ref), "hang_reports": hang_reports(ref),
                          "tasks": [{"job_id": r.job_id, "state": r.slurm_state, "folded": r.state.value,
                                     "reason": r.reason, "final": final(r), "elapsed": r.elapsed,
                                     "source": r.source} for r in rows]}, indent=2))
        return 0
    print(f"job       {ref.job_id} ({ref.backend})")
    print(f"run dir   {ref.run_dir or '(unknown)'}")
    for r in rows:
        reason = f"  reason: {r.reason}" if r.reason else ""
        timing = f"  elapsed {r.elapsed}" + (f" / {r.time_limit}" if r.time_limit else "") if r.elapsed else ""
        print(f"state     {r.job_id:<12} {r.slurm_state:<11}{timing}{reason}  [{r.source}]")
        if r.slurm_state == "STOPPED":
            print(f"          {final(r)}; continue with `hpcqwen resume {ref.run_dir}`")
        if r.slurm_state == "HUNG":
            print(f"          {final(r)}")
    print(f"restarts  {restarts(ref)}")
    for report in hang_reports(ref):
        print(f"hang      {report}")
    logs = runs.log_files(ref) if ref.run_dir else []
    if logs:
        print(f"log       {logs[-1]}")
    return 0
