"""`hpcqwen resume RUN_DIR`: submit an existing run dir again; its runs continue from their checkpoints.

For a run that ended STOPPED (restart limit, requeue refused), FAILED after saving, CANCELLED, or
TIMEOUT: the unfinished tasks are submitted again on the run's backend (or `--backend`), with a
freshly rendered job.sbatch, and each resumes from its newest complete checkpoint. A run whose job
is still queued or running is refused (and a second live launch of a task is refused on the node
by the task's launch lease in any case).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcqwen import backends, runs
from hpcqwen.errors import EXIT_OK, HpcqwenError, RunDirError
from hpcqwen.paths import is_run_dir
from hpcqwen.rundir import read_manifest
from hpcqwen.spec import read_frozen_spec
from hpcqwen.submit import resubmit


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR [--backend ...] [--wait]."""
    p.add_argument("run_dir", help="the run dir that `hpcqwen submit` printed")
    p.add_argument("--backend", default=None, choices=["auto", *backends.BACKENDS],
                   help="where to run it (default: the backend it was submitted to)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 3 unless it COMPLETED")


def run(args: argparse.Namespace) -> int:
    """Check the run is not live, then resubmit its unfinished tasks."""
    run_dir = Path(args.run_dir).expanduser().resolve()
    if not is_run_dir(run_dir):
        raise RunDirError(f"{args.run_dir} is not an hpcqwen run dir (no spec.json)",
                          hint="give the run dir that `hpcqwen submit` printed")
    ref = runs.resolve_target(str(run_dir))
    live = [r for r in runs.job_rows(ref) if not r.state.is_terminal and r.state.value != "UNKNOWN"]
    if live:
        raise HpcqwenError(f"job {ref.job_id} of this run is still {live[0].slurm_state}",
                           where=str(run_dir), hint=f"wait for it, or `hpcqwen cancel {run_dir}` first")
    spec = read_frozen_spec(run_dir / "spec.json")
    requested = args.backend or str(read_manifest(run_dir).get("backend") or "auto")
    backend, why = backends.choose_backend(requested, spec, wait=args.wait)
    print(f"backend: {why}", file=sys.stderr)
    sub = resubmit(run_dir, backend)
    print(f"resumed: submitted job {', '.join(sub.job_ids)}  run dir: {sub.run_dir}")
    if not args.wait:
        return EXIT_OK
    ref = runs.resolve_target(str(sub.run_dir))
    runs.check_completed(ref, runs.wait_for(ref), sub.job_ids[0])
    print(f"job {sub.job_ids[0]} COMPLETED  run dir: {sub.run_dir}")
    return EXIT_OK
