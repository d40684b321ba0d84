"""A 2-node SFT through `hpcqwen submit` on the local Slurm cluster, requeued mid-run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import scontrol_requeue

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_train]
DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"


def test_two_node_sft_requeued_mid_run_resumes_and_finishes(slurm_cluster: str, write_spec, tiny_qwen3_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: sft-2node
        resources: {{nodes: 2, nproc_per_node: 1, time_limit_min: 20}}
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{DATA}]
          torch_dtype: float32
          max_steps: 60
          save_steps: 10
          logging_steps: 5
          per_device_train_batch_size: 4
          gradient_accumulation_steps: 2
          learning_rate: 5e-3
          max_length: 256
          gradient_checkpointing: false
    """)
    assert main(["submit", str(spec)]) == 0
    out = capsys.readouterr().out
    job, run_dir = out.split("submitted job ")[1].split("  run dir: ")
    run_dir = Path(run_dir.strip())
    marker = run_dir / "checkpoints" / "checkpoint-10" / "hpcqwen-complete.json"
    end = time.time() + 300
    while not marker.exists():
        assert time.time() < end, "no complete checkpoint-10"
        time.sleep(0.2)
    scontrol_requeue(job)
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = next((run_dir / "logs").glob("sft-2node-*.out")).read_text()
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-3000:]
    assert "sft: lora on 2 processes" in log
    resumed = [line for line in log.splitlines() if line.startswith("sft: resuming from ")]
    assert len(resumed) == 1 and int(resumed[0].rsplit("checkpoint-", 1)[1]) >= 10
    final = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert (final["phase"], final["step"], final["total_steps"]) == ("done", 60, 60)
    assert (run_dir / "checkpoints" / "checkpoint-60" / "hpcqwen-complete.json").is_file()
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["restart_count"] for x in launches] == [0, 1] and all(x["nnodes"] == 2 for x in launches)


def test_the_quickstart_job_as_the_readme_runs_it(slurm_cluster: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/quickstart.sh's two steps: build the tiny model, then submit jobspecs/quickstart.yaml."""
    import subprocess
    import sys

    model = tmp_path / "qwen3-tiny"
    build = subprocess.run([sys.executable, "-m", "hpcqwen.testing", "tiny-qwen3", str(model)], capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0 and "tiny random Qwen3 written" in build.stdout, build.stderr
    monkeypatch.setenv("HPCQWEN_TINY_MODEL", str(model))
    spec = Path(__file__).resolve().parents[2] / "jobspecs" / "quickstart.yaml"
    assert main(["submit", str(spec), "--wait"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("backend: slurm (")
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    final = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert (final["phase"], final["step"]) == ("done", 30)
    assert (run_dir / "checkpoints" / "checkpoint-30" / "adapter_model.safetensors").is_file()
