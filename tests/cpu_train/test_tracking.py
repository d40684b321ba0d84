"""`task.report_to` (issue 13 item 19): tensorboard, wandb (offline mode) and mlflow (file store) from real SFT,
GRPO and Megatron runs, with the run name and job id attached, everything under the task dir, a requeued
attempt continuing the same runs, and the wandb key nowhere on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.metrics import read_metrics

pytestmark = pytest.mark.cpu_train
REPO = Path(__file__).resolve().parents[2]
SECRET = "hpcqwen-test-wandb-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def _offline_trackers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell as a user's on a cluster: a wandb key exported, no tracker settings of its own."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_NAME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own MlflowClient


def _submit(spec: Path, capsys: pytest.CaptureFixture[str], wait: bool = True) -> tuple[Path, str]:
    assert main(["submit", str(spec), "--backend", "local", *(["--wait"] if wait else [])]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    return Path(out.split("run dir: ")[1].split()[0]), out.split("submitted job ")[1].split()[0]


def _mlflow_runs(task_dir: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{task_dir / 'mlruns'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {task_dir / 'mlruns'}"
    return [(r, client.get_metric_history(r.info.run_id, "loss") if "loss" in r.data.metrics else [])
            for r in client.search_runs([found.experiment_id])]


def _wandb_run_file(task_dir: Path, run_id: str) -> bytes:
    """The offline run's record log (protobuf records; wandb 0.31 ships no reader for it, so it is read as bytes)."""
    runs = list((task_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, f"no offline wandb run {run_id} in {task_dir / 'wandb'}"
    return b"".join(p.read_bytes() for r in runs for p in r.glob("*.wandb"))


def _no_secret_under(folder: Path) -> None:
    leaks = [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the wandb key was written to {leaks}"


def test_sft_reports_to_tensorboard_wandb_and_mlflow_and_a_resume_continues_the_runs(
        write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: track-sft
        resources: {{time_limit_min: 20}}
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{REPO}/jobspecs/data/sft-tiny.jsonl]
          report_to: [tensorboard, wandb, mlflow]
          torch_dtype: float32
          max_steps: 12
          save_steps: 100
          logging_steps: 1
          per_device_train_batch_size: 2
          gradient_accumulation_steps: 4
          max_length: 128
          gradient_checkpointing: false
    """)
    run_dir, job = _submit(spec, capsys, wait=False)
    end = time.time() + 300
    while not any(m.get("step", 0) >= 3 for m in read_metrics(run_dir / "metrics.jsonl")):
        assert time.time() < end and not (run_dir / "logs" / "local.rc").exists(), "no step 3"
        time.sleep(0.1)
    (run_dir / "STOP").touch()  # as the batch script's USR2 trap: save, exit 75; then a requeued attempt
    while not (run_dir / "logs" / "local.rc").exists():
        assert time.time() < end, "the run did not stop"
        time.sleep(0.2)
    stopped_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    log = next((run_dir / "logs").glob("*-local.out"))
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-m", "hpcqwen.localrun", str(run_dir)], check=True, timeout=600,
                       stdout=out, stderr=out)
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["phase"] == "done"

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    (run, losses), = _mlflow_runs(run_dir, "track-sft")  # one run over both attempts
    assert run.info.run_name == "track-sft" and run.data.tags["hpcqwen.run_dir"] == str(run_dir)
    last_job = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[-1])["job_id"]
    assert run.data.tags["hpcqwen.job_id"] == last_job != job  # the latest attempt's (a requeue keeps Slurm's)
    assert sorted({m.step for m in losses}) == list(range(1, 13)) and stopped_at < 12
    assert (run_dir / ".mlflow-run-id").read_text().strip() == run.info.run_id
    record = _wandb_run_file(run_dir, run_dir.name)
    assert b"track-sft" in record and f"slurm-job-{job}".encode() in record and b"loss" in record
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_dir.name}"))) == 2  # both attempts, one id
    _no_secret_under(run_dir)


def test_grpo_reports_rewards_to_mlflow_and_wandb(write_spec, tiny_qwen3_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: track-grpo
        resources: {{nproc_per_node: 1, time_limit_min: 20}}
        task:
          kind: grpo
          model: {tiny_qwen3_dir}
          dataset: {REPO}/jobspecs/data/math-tiny.jsonl
          reward_funcs: [accuracy, {REPO}/jobspecs/plugins/example_reward.py:brevity]
          report_to: [mlflow, wandb]
          num_generations: 2
          per_device_train_batch_size: 2
          max_steps: 2
          save_steps: 2
          logging_steps: 1
          max_completion_length: 8
          torch_dtype: float32
          gradient_checkpointing: false
    """)
    run_dir, job = _submit(spec, capsys)
    (run, _), = _mlflow_runs(run_dir, "track-grpo")
    assert run.info.run_name == "track-grpo" and run.data.tags["hpcqwen.job_id"] == job
    assert any(k.startswith("rewards/brevity") for k in run.data.metrics), run.data.metrics
    assert b"rewards/brevity" in _wandb_run_file(run_dir, run_dir.name)
    assert not (run_dir / "tensorboard").exists()  # not asked for
    _no_secret_under(run_dir)


def test_none_turns_tracking_off(write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: track-none
        task: {{kind: sft, model: {tiny_qwen3_dir}, dataset: [{REPO}/jobspecs/data/sft-tiny.jsonl], report_to: none,
                max_steps: 2, save_steps: 2, logging_steps: 1, max_length: 128, torch_dtype: float32}}
    """)
    run_dir, _ = _submit(spec, capsys)
    assert not any((run_dir / name).exists() for name in ("tensorboard", "wandb", "mlruns"))
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m] == [1, 2]  # metrics.jsonl
    assert json.loads((run_dir / "spec.json").read_text())["task"]["report_to"] == ["none"]
