"""Partition preemption on the real local Slurm cluster: SIGTERM to every process of the step, GraceTime,
the batch script requeues itself; through the sbatch and the submitit backends. A preempting job takes whole
nodes, so this file runs alone on the cluster (tests/conftest.py, EXCLUSIVE_FILES)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import wait_until
from signal_helpers import DATA, log_of, preempt, state, step_of, steps_spec, submit

from hpcqwen import runs
from hpcqwen.metrics import read_metrics

pytestmark = pytest.mark.slurm


def test_partition_preemption_saves_within_grace_requeues_and_finishes(
        slurm_cluster: str, write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 2-node SFT in `low` is preempted by a job in `high` that needs both nodes."""
    spec = write_spec(f"""
        name: sft-low
        resources: {{nodes: 2, nproc_per_node: 1, time_limit_min: 20, partition: low}}
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{DATA}]
          torch_dtype: float32
          max_steps: 40
          save_steps: 100
          logging_steps: 1
          per_device_train_batch_size: 4
          gradient_accumulation_steps: 2
          learning_rate: 5e-3
          max_length: 256
          gradient_checkpointing: false
    """)
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: any(m.get("step", 0) >= 5 and "loss" in m for m in read_metrics(run_dir / "metrics.jsonl")),
               300, "5 training steps")
    high = preempt(job, "sleep 5")
    preempted_at = time.time()
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-3000:]
    assert "got SIGTERM: saving at the end of this step" in log
    assert "hpcqwen: stopped; requeued" in log
    stopped = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "stopped"]
    assert len(stopped) == 1
    saved = run_dir / "checkpoints" / f"checkpoint-{stopped[0]['step']}" / "hpcqwen-complete.json"
    assert saved.is_file() and saved.stat().st_mtime - preempted_at < 60  # inside GraceTime (60 s)
    train = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "train" and "loss" in m]
    assert train == list(range(1, 41))  # every step once: nothing lost, nothing logged twice
    resumed = [x for x in log.splitlines() if x.startswith("sft: resuming from ")]
    assert len(resumed) == 1 and resumed[0].endswith(f"checkpoint-{stopped[0]['step']}")
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["restart_count"] for x in launches] == [0, 1]
    assert state(high.stdout.strip()) in ("COMPLETED", "")


def test_submitit_backend_preempted_requeues_and_resumes(slurm_cluster: str, write_spec,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "subpre", 40, 0.5, partition="low")
    job, run_dir = submit(capsys, str(spec), "--backend", "submitit")
    wait_until(lambda: step_of(run_dir) >= 3, 120, "3 steps")
    preempt(job, "sleep 3")
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*_log.out"))
    assert [r.slurm_state for r in rows] == ["COMPLETED"], logs[-3000:]
    assert "steps: stop requested (SIGTERM)" in logs and "hpcqwen: stopped; requeued" in logs
    assert "restart_count=1" in logs and step_of(run_dir) == 40
