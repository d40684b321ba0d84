"""A stand-in for a runner's step loop with the stop-file protocol, for requeue tests.

Counts `--steps` steps of `--step-seconds` each, saving progress to TASK_DIR/progress.json
after every step. When TASK_DIR/STOP appears (the batch script's USR2 trap), it records
"stopped at step N" and exits 0 so the batch script can requeue; a restart resumes from the
saved step. It also prints SLURM_RESTART_COUNT as the launcher passed it on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    """Run (or resume) the step loop."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-seconds", type=float, default=1.0)
    args = p.parse_args()
    task_dir = Path(os.environ["HPCQWEN_TASK_DIR"])
    progress = task_dir / "progress.json"
    step = json.loads(progress.read_text())["step"] if progress.exists() else 0
    print(f"steps: start at step {step} restart_count={os.environ.get('HPCQWEN_RESTART_COUNT')} "
          f"job={os.environ.get('HPCQWEN_JOB_ID')}", flush=True)
    while step < args.steps:
        if (task_dir / "STOP").exists():
            print(f"steps: STOP seen, stopped at step {step}", flush=True)
            return
        time.sleep(args.step_seconds)
        step += 1
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        tmp.replace(progress)
    print(f"steps: finished {step} steps", flush=True)


if __name__ == "__main__":
    main()
