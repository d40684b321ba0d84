"""Sweeps on the real local cluster: 12 tiny SFTs (lr × lora_rank × 2 seeds) as one array and their report, and an
array above MaxArraySize submitted in chunks whose tasks keep their own task dirs."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen import runs, slurm, slurminfo
from hpcqwen.backends import SlurmBackend
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK
from hpcqwen.paths import RunPaths
from hpcqwen.requeue import read_outcome
from hpcqwen.spec import load_spec, read_source
from hpcqwen.submit import submit

pytestmark = pytest.mark.slurm
DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"


@pytest.mark.cpu_train
def test_a_sweep_of_12_tiny_sfts_is_one_array_and_one_table(slurm_cluster: str, write_spec, tiny_qwen3_dir: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: sweep12
        resources: {{gpus_per_node: 1, time_limit_min: 15}}
        env: {{OMP_NUM_THREADS: "1"}}
        array: {{throttle: 6}}
        sweep:
          grid: {{learning_rate: [1e-3, 3e-3, 1e-2], lora_rank: [4, 8]}}
          seeds: [1, 2]
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{DATA}#32]
          torch_dtype: float32
          max_steps: 4
          per_device_train_batch_size: 4
          max_length: 128
          save_steps: 4
          logging_steps: 1
          split_dataset_ratio: 0.25
          eval_steps: 2
          gradient_checkpointing: false
    """)
    assert main(["submit", str(spec), "--wait"]) == EXIT_OK
    out = capsys.readouterr().out
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    assert len(json.loads((run_dir / "manifest.json").read_text())["job_ids"]) == 1  # one array, one sbatch
    csv_path = tmp_path / "sweep.csv"
    assert main(["sweep", "report", str(run_dir), "--sort", "loss", "--csv", str(csv_path)]) == EXIT_OK
    table = capsys.readouterr().out
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 and {r["state"] for r in rows} == {"COMPLETED"}
    assert {(r["learning_rate"], r["lora_rank"], r["seed"]) for r in rows} == {
        (lr, rank, seed) for lr in ("0.001", "0.003", "0.01") for rank in ("4", "8") for seed in ("1", "2")}
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses) and all(float(r["eval_loss"]) > 0 for r in rows)
    assert all(float(r["tokens_per_s"]) > 0 and float(r["gpu_hours"]) > 0 for r in rows)
    print(f"\n{table}")


def _max_array_size(limit: int) -> slurm.RunCmd:
    """The real Slurm, except `scontrol show config`, which says MaxArraySize = `limit` (stubbed)."""
    def run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        if list(argv[:3]) == ["scontrol", "show", "config"]:
            return subprocess.CompletedProcess(list(argv), 0, f"MaxArraySize            = {limit}\n", "")
        return slurm.run_cmd(argv, timeout)
    return run


def test_an_array_above_max_array_size_runs_in_chunks_stubbed_config(slurm_cluster: str, write_spec) -> None:
    path = write_spec("name: chunk7\nresources: {time_limit_min: 10}\narray: {size: 7, throttle: 2}\n"
                      "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1', --step-seconds, "
                      "'0.1']}\n")
    spec = load_spec(path)
    limit, source = slurminfo.max_array_size(spec.cluster.max_array_size, run=_max_array_size(3))
    assert (limit, source) == (3, "scontrol show config")
    sub = submit(spec, read_source(path), SlurmBackend(), limit)
    assert len(sub.job_ids) == 3
    manifest = json.loads((sub.run_dir / "manifest.json").read_text())
    assert [(c["offset"], c["count"]) for c in manifest["array_chunks"]] == [(0, 3), (3, 3), (6, 1)]
    assert "#SBATCH --array=0%2" in (sub.run_dir / "job-chunk-2.sbatch").read_text()
    assert f"#SBATCH --dependency=afterany:{sub.job_ids[1]}" in (sub.run_dir / "job-chunk-2.sbatch").read_text()
    ref = runs.resolve_target(str(sub.run_dir))
    wait_until(lambda: runs.is_finished(ref, runs.job_rows(ref)), 180, "every chunk to finish", every=1)
    rows = runs.job_rows(ref)
    assert [(r.array_task_id, r.slurm_state) for r in rows] == [(i, "COMPLETED") for i in range(7)]
    assert [read_outcome(RunPaths(sub.run_dir).task(i)) for i in range(7)] == ["done"] * 7  # each its own dir
