"""`hpcqwen cost` on a real run that was requeued twice: the figures add up to sacct's total of GPU-hours."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import scontrol_requeue, wait_until

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.cost import CATEGORIES
from hpcqwen.errors import EXIT_OK

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_train]
DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"


def _requeue_after(job: str, marker: Path, launches: Path, starts: int) -> None:
    """`scontrol requeue` once `marker` (a complete checkpoint) exists in incarnation number `starts`."""
    wait_until(lambda: marker.exists() and len(launches.read_text().splitlines()) == starts, 300,
               f"{marker.parent.name} in start {starts}")
    scontrol_requeue(job)


def test_a_run_requeued_twice_adds_up_to_the_sacct_total(slurm_cluster: str, write_spec, tiny_qwen3_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: cost-rq2
        resources: {{gpus_per_node: 2, nproc_per_node: 1, time_limit_min: 20}}
        env: {{OMP_NUM_THREADS: "1"}}
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{DATA}]
          torch_dtype: float32
          max_steps: 40
          save_steps: 5
          logging_steps: 1
          per_device_train_batch_size: 4
          gradient_accumulation_steps: 4
          max_length: 128
          gradient_checkpointing: false
    """)
    assert main(["submit", str(spec)]) == EXIT_OK
    job, run_dir_text = capsys.readouterr().out.split("submitted job ")[1].split("  run dir: ")
    run_dir = Path(run_dir_text.strip())
    ckpts, launches = run_dir / "checkpoints", run_dir / "launches.jsonl"
    wait_until(launches.exists, 120, "the first start")
    _requeue_after(job, ckpts / "checkpoint-5" / "hpcqwen-complete.json", launches, 1)
    _requeue_after(job, ckpts / "checkpoint-20" / "hpcqwen-complete.json", launches, 2)
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["COMPLETED"]
    end = time.time() + 30  # accounting lags the queue by a few seconds
    while True:
        out = subprocess.run(["sacct", "--duplicates", "-X", "-n", "-P", f"--jobs={job}",
                              "--format=State,Start,End,AllocTRES"], capture_output=True, text=True).stdout
        lines = [x.split("|") for x in out.splitlines() if x.strip()]
        if [x[0] for x in lines] == ["REQUEUED", "REQUEUED", "COMPLETED"] or time.time() > end:
            break
        time.sleep(1)
    assert [x[0] for x in lines] == ["REQUEUED", "REQUEUED", "COMPLETED"]
    gpu_s = [(dt.datetime.fromisoformat(x[2]) - dt.datetime.fromisoformat(x[1])).total_seconds() * 2 for x in lines]
    assert all("gres/gpu=2" in x[3] for x in lines)
    at_end = json.loads((run_dir / "cost.json").read_text())  # written by the job itself at its end
    assert at_end["incarnations"] == 3 and at_end["source"] == "sacct --duplicates"
    assert main(["cost", str(run_dir), "--json"]) == EXIT_OK
    cost = json.loads(capsys.readouterr().out)
    assert cost["final"] and cost["incarnations"] == 3
    assert cost["allocated_gpu_hours"] == pytest.approx(sum(gpu_s) / 3600, abs=2e-6)
    assert sum(cost["gpu_hours"][c] for c in CATEGORIES) == pytest.approx(cost["allocated_gpu_hours"], abs=5e-6)
    g = cost["gpu_hours"]
    assert g["startup"] > 0 and g["steps_kept"] > 0 and g["saving"] > 0 and g["steps_lost"] > 0
    assert cost["tokens"] > 0 and cost["tokens_per_gpu_hour"] > 0
    assert main(["cost", str(run_dir)]) == EXIT_OK
    print(f"\nrequeued twice (sacct: {', '.join(f'{s:.0f} GPU-s' for s in gpu_s)}):\n{capsys.readouterr().out}")
