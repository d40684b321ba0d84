"""Fixtures for the monitor's real-Slurm tests: long-lived jobs with training progress, and a
terminal (tmux) to run the live view in."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from monitor_helpers import SUFFIX, MonitorJobs, Tmux, fake_train, submit


@pytest.fixture(scope="session")
def monitor_jobs(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitorJobs]:
    """Long-lived jobs for the monitor tests (cancelled at the end of the session):
    - `sft`: fake training, 1 step per 1.5 s for 200 steps, a checkpoint every 5 steps;
    - `dep`: afterok on `sft`, so PENDING (Dependency) the whole time;
    - `arr`: a 4-task array with throttle 2 (GRPO-style metrics): 2 tasks run, 2 wait."""
    root = tmp_path_factory.mktemp("monitor-runs")
    root.chmod(0o755)
    limits = "resources: {time_limit_min: 15}\n"
    sft, sft_dir = submit(root, f"mon{SUFFIX}-sft", limits + fake_train(200, 1.5, "--save-every", "5"))
    dep, _ = submit(root, f"mon{SUFFIX}-dep", limits + f"depends_on: [{sft}]\n"
                    + "task: {kind: command, module: hpcqwen.examples.steps, args: ['--steps', '1']}\n")
    arr, arr_dir = submit(root, f"mon{SUFFIX}-arr", limits + "array: {size: 4, throttle: 2}\n"
                          + fake_train(200, 1.5, "--grpo"))
    jobs = MonitorJobs(root, f"mon{SUFFIX}-*", sft, sft_dir, dep, arr, arr_dir)
    try:
        yield jobs
    finally:
        subprocess.run(["scancel", sft, dep, arr], capture_output=True, check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    """A terminal to run the live view in."""
    term = Tmux(tmp_path)
    try:
        yield term
    finally:
        term.close()
