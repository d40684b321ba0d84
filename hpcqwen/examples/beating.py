"""A gloo all_reduce loop that reports heartbeats: the watchdog's workload without a model (tests, bench).

Each step: beat `forward`, sleep `--step-seconds`, the test-only hang hook (`hpcqwen.testing_faults`, only
when HPCQWEN_TEST_FAULT is set), one all_reduce, beat `data`. It shows what a `command` module does to be
watched: `hpcqwen.heartbeat.start_rank` once, then `heartbeat.beat(phase, step)`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcqwen import heartbeat, stopping


def main() -> None:
    """Run the loop over every rank of the launcher."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-seconds", type=float, default=0.05)
    args = p.parse_args()
    task_dir = Path(os.environ["HPCQWEN_TASK_DIR"])
    stopping.install_handlers(task_dir / "STOP")
    heartbeat.start_rank(task_dir)
    timeout = datetime.timedelta(seconds=heartbeat.collective_timeout_s(1800))
    dist.init_process_group("gloo", timeout=timeout)
    faults: Any = None
    if os.environ.get("HPCQWEN_TEST_FAULT"):
        from hpcqwen import testing_faults as faults
    for step in range(1, args.steps + 1):
        heartbeat.beat("forward", step)
        time.sleep(args.step_seconds)
        if faults is not None:
            faults.maybe_hang(step)
        t = torch.ones(1)
        dist.all_reduce(t)
        heartbeat.beat("data", step)
    print(f"beating: rank {dist.get_rank()} finished {args.steps} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
