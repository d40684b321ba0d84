"""A stand-in for a runner's step loop with the stop-file protocol, for requeue tests.

Counts `--steps` steps of `--step-seconds` each, saving progress to TASK_DIR/progress.json
after every step. On a stop request (SIGTERM/SIGUSR2 or TASK_DIR/STOP: `hpcqwen.stopping`) it
prints "stopped at step N" and exits 75 (stopped, resumable) so the batch script can requeue; a
restart resumes from the saved step. It also prints SLURM_RESTART_COUNT as the launcher passed it on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hpcqwen import fs, stopping


def main() -> None:
    """Run (or resume) the step loop."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-seconds", type=float, default=1.0)
    args = p.parse_args()
    task_dir = Path(os.environ["HPCQWEN_TASK_DIR"])
    stopping.install_handlers(task_dir / "STOP")
    progress = task_dir / "progress.json"
    step = json.loads(progress.read_text())["step"] if progress.exists() else 0
    print(f"steps: start at step {step} restart_count={os.environ.get('HPCQWEN_RESTART_COUNT')} "
          f"job={os.environ.get('HPCQWEN_JOB_ID')}", flush=True)
    while step < args.steps:
        if stopping.requested():
            print(f"steps: stop requested ({stopping.received() or 'STOP file'}), stopped at step {step}", flush=True)
            sys.exit(stopping.EXIT_STOPPED)
        time.sleep(args.step_seconds)
        step += 1
        fs.write_atomic(progress, json.dumps({"step": step}))
        stopping.mark_progress(task_dir / "PROGRESS")
    print(f"steps: finished {step} steps", flush=True)


if __name__ == "__main__":
    main()
