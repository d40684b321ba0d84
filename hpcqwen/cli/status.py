"""`hpcqwen status JOB|RUN_DIR`: state of every task, the run dir and its log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcqwen import runs
from hpcqwen.cli._common import add_target_argument
from hpcqwen.paths import RunPaths


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET [--json]."""
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def restarts(run_dir: Path | None) -> int:
    """Restarts recorded by the launcher (launches.jsonl)."""
    if run_dir is None or not RunPaths(run_dir).launches.exists():
        return 0
    counts = [json.loads(line).get("restart_count", 0) for line in RunPaths(run_dir).launches.read_text().splitlines()
              if line.strip()]
    return max(counts, default=0)


def run(args: argparse.Namespace) -> int:
    """Print the state (exit 0 whatever the state; the state is data, not an error)."""
    ref = runs.resolve_target(args.target)
    rows = runs.job_rows(ref)
    if args.json:
        print(json.dumps({"job_id": ref.job_id, "run_dir": str(ref.run_dir) if ref.run_dir else None,
                          "backend": ref.backend, "restarts": restarts(ref.run_dir),
                          "tasks": [{"job_id": r.job_id, "state": r.slurm_state, "folded": r.state.value,
                                     "reason": r.reason, "elapsed": r.elapsed, "source": r.source} for r in rows]},
                         indent=2))
        return 0
    print(f"job       {ref.job_id} ({ref.backend})")
    print(f"run dir   {ref.run_dir or '(unknown)'}")
    if not rows:
        print("state     UNKNOWN (neither squeue nor sacct knows this job)")
    for r in rows:
        reason = f"  reason: {r.reason}" if r.reason else ""
        timing = f"  elapsed {r.elapsed}" + (f" / {r.time_limit}" if r.time_limit else "") if r.elapsed else ""
        print(f"state     {r.job_id:<12} {r.slurm_state:<11}{timing}{reason}  [{r.source}]")
    print(f"restarts  {restarts(ref.run_dir)}")
    logs = runs.log_files(ref) if ref.run_dir else []
    if logs:
        print(f"log       {logs[-1]}")
    return 0
