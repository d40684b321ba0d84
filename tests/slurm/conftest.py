"""Fixtures for the monitor's real-Slurm tests: long-lived jobs with training progress, and a
terminal (tmux) to run the live view in."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from monitor_helpers import MonitorJobs, Tmux, fake_train, submit


# Module scope: the jobs (a real SFT among them) are cancelled as soon as a monitor module is done,
# so they do not take CPU from the tests that come after.
@pytest.fixture(scope="module")
def monitor_jobs(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory,
                 tiny_qwen3_dir: Path) -> Iterator[MonitorJobs]:
    """Long-lived jobs for the monitor tests (cancelled at the end of the module):
    - `sft`: a real LoRA SFT of the tiny Qwen3 (hpcqwen.runners.sft), 200 steps of 64 accumulated
      micro-batches (about a second each on one core), a checkpoint every 5 steps;
    - `dep`: afterok on `sft`, so PENDING (Dependency) the whole time;
    - `arr`: a 4-task array with throttle 2 (GRPO-style metrics): 2 tasks run, 2 wait."""
    root = tmp_path_factory.mktemp("monitor-runs")
    tag = uuid.uuid4().hex[:6]  # other sessions' jobs (and the other module's) share the cluster
    root.chmod(0o755)
    limits = "resources: {time_limit_min: 15}\n"
    data = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"
    sft, sft_dir = submit(root, f"mon{tag}-sft", limits + "env: {OMP_NUM_THREADS: '1'}\n" + f"""
task:
  kind: sft
  model: {tiny_qwen3_dir}
  dataset: [{data}]
  torch_dtype: float32
  max_steps: 200
  save_steps: 5
  logging_steps: 1
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 64
  max_length: 128
  gradient_checkpointing: false
""")
    dep, _ = submit(root, f"mon{tag}-dep", limits + f"depends_on: [{sft}]\n"
                    + "task: {kind: command, module: hpcqwen.examples.steps, args: ['--steps', '1']}\n")
    arr, arr_dir = submit(root, f"mon{tag}-arr", limits + "array: {size: 4, throttle: 2}\n"
                          + fake_train(200, 1.5, "--grpo"))
    jobs = MonitorJobs(root, tag, f"mon{tag}-*", sft, sft_dir, dep, arr, arr_dir)
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
