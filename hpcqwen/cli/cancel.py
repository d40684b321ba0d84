"""`hpcqwen cancel JOB|RUN_DIR`: scancel (or stop a local run)."""

from __future__ import annotations

import argparse
import os
import signal

from hpcqwen import runs, slurm
from hpcqwen.cli._common import add_target_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET."""
    add_target_argument(p)


def run(args: argparse.Namespace) -> int:
    """Cancel the whole job (or the one array task named as 123_4)."""
    ref = runs.resolve_target(args.target)
    if ref.backend == "local":
        pid = int(ref.job_id.removeprefix("local-"))
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            print(f"{ref.job_id} is not running")
            return 0
    else:
        target = f"{ref.job_id}_{ref.array_task}" if ref.array_task is not None else ref.job_id
        slurm.scancel([target])
    print(f"cancelled {ref.job_id}" + (f"_{ref.array_task}" if ref.array_task is not None else ""))
    return 0
