"""`hpcqwen launch RUN_DIR`: what srun runs on every node (see hpcqwen.launch)."""

from __future__ import annotations

import argparse

from hpcqwen import launch


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR."""
    p.add_argument("run_dir", help="run dir holding spec.json")


def run(args: argparse.Namespace) -> int:
    """Exec the task (returns only if exec fails)."""
    return launch.main(args.run_dir)
