"""The Megatron runner itself on the CPU: 2 processes (gloo), TP 2 + sequence parallel, a tiny untied
Qwen3-MoE with grouped-GEMM experts, packing, SDPA, the MoE aux loss, a held-out eval split; Megatron's
schedule, DDP and the DistributedOptimizer; then STOP -> save -> resume, and `hpcqwen export --to-hf`.

megatron-core's CUDA assumptions are patched in the runner's processes by tests/megatron_runner_cpu.py
(tests/megatron_helpers.py: apply_training_shims); the runner code is the GPU code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from megatron_helpers import build_moe, free_port

from hpcqwen.cli import main
from hpcqwen.metrics import read_metrics
from hpcqwen.spec import load_spec

pytestmark = [pytest.mark.cpu_train, pytest.mark.cpu_dist]
REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "tests" / "megatron_runner_cpu.py"
ITERS = 12

SPEC = """\
name: mg-cpu
cluster: {{profile: h100-8x, cache_root: {cache}}}
resources: {{nodes: 1, nproc_per_node: 2}}
task:
  kind: megatron
  load: {model}
  dataset: {data}
  tensor_model_parallel_size: 2
  sequence_parallel: true
  moe_grouped_gemm: true
  moe_aux_loss_coeff: 0.01
  use_flash_attn: true
  packing: true
  micro_batch_size: 1
  global_batch_size: 2
  max_length: 128
  train_iters: {iters}
  save_interval: 100
  split_dataset_ratio: 0.2
  eval_interval: 6
  eval_iters: 2
  log_interval: 1
  lr: 1e-3
  lr_warmup_iters: 1
  save_total_limit: 1
"""


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_moe(tmp_path_factory.mktemp("moe-runner") / "model", tiny_tokenizer_dir, tie_word_embeddings=False)


def run_dir(root: Path, name: str, model: Path, iters: int = ITERS, extra: str = "") -> Path:
    """A run dir with the frozen spec.json, as `hpcqwen submit` writes it (no job is submitted)."""
    spec_file = root / f"{name}.yaml"
    spec_file.write_text(SPEC.format(cache=root / "cache", model=model, data=REPO / "jobspecs/data/sft-tiny.jsonl",
                                     iters=iters) + extra)
    folder = root / name
    folder.mkdir()
    (folder / "spec.json").write_text(load_spec(spec_file).model_dump_json())
    return folder


class Ranks:
    """Two ranks of the wrapper with the environment hpcqwen's launcher gives them (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_*, HPCQWEN_TASK_DIR), so each rank's own exit code can be checked."""

    def __init__(self, folder: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_"))}
        port = str(free_port())
        self.logs = [folder.parent / f"{folder.name}-rank{r}.log" for r in (0, 1)]
        self.procs = [subprocess.Popen([sys.executable, str(WRAPPER), str(folder)], stdout=open(log, "a"),  # noqa: SIM115
                                       stderr=subprocess.STDOUT, text=True,
                                       env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                            "HPCQWEN_TASK_DIR": str(folder), "HPCQWEN_RUN_DIR": str(folder)})
                      for r, log in zip((0, 1), self.logs, strict=True)]

    def poll(self) -> int | None:
        return self.procs[0].poll()


def runner(folder: Path) -> Ranks:
    return Ranks(folder)


def finish(ranks: Ranks, code: int = 0) -> str:
    codes = [p.wait(timeout=300) for p in ranks.procs]
    out = "".join(log.read_text() for log in ranks.logs)
    assert codes == [code, code], out[-8000:]
    return out


def losses(folder: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(folder / "metrics.jsonl") if "loss" in m}


def test_train_stop_resume_equals_uninterrupted_then_export(tmp_path: Path, moe_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    straight, stopped = run_dir(tmp_path, "straight", moe_dir), run_dir(tmp_path, "stopped", moe_dir)
    log = finish(runner(straight))
    assert "converted 21 tensors" in log and "experts TorchGroupedMLP" in log and "attention SdpaAttention" in log

    proc = runner(stopped)  # the batch script's USR2 trap touches STOP; here: once iteration 2 is logged
    end = time.time() + 240
    while not any(m.get("step", 0) >= 2 for m in read_metrics(stopped / "metrics.jsonl")):
        assert proc.poll() is None and time.time() < end, "the run ended before it could be stopped"
        time.sleep(0.02)
    (stopped / "STOP").touch()
    finish(proc, 75)  # stopped, resumable
    last = read_metrics(stopped / "metrics.jsonl")[-1]
    assert last["phase"] == "stopped" and 2 <= last["step"] < ITERS
    saved = stopped / "checkpoints" / f"iter_{last['step']:07d}"
    assert (saved / "hpcqwen-complete.json").is_file() and (saved / "hf" / "config.json").is_file()
    assert json.loads((saved / "hpcqwen-complete.json").read_text())["save_s"] > 0
    crashed = stopped / "checkpoints" / "iter_0000001"  # a save that died: no marker, older than `saved`
    crashed.mkdir()
    (crashed / "common.pt").write_bytes(b"torn")
    (stopped / "STOP").unlink()  # the batch script removes it when the job restarts
    log = finish(runner(stopped))
    assert f"resumed {saved} at iteration {last['step']}" in log
    # save_total_limit 1: only the last complete checkpoint stays; the crashed save is gone too
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir() if p.is_dir()) == [f"iter_{ITERS:07d}"]

    a, b = losses(straight), losses(stopped)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1))
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6, (a, b)  # Adam's step restored (else ~4e-2 apart)
    assert sum(list(a.values())[-3:]) / 3 < sum(list(a.values())[:3]) / 3 - 0.3  # it learns
    rows = [m for m in read_metrics(straight / "metrics.jsonl") if "loss" in m]
    for key in ("lr", "grad_norm", "tokens_per_s", "moe_aux_loss", "peak_mem_gb"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert read_metrics(straight / "metrics.jsonl")[-1]["phase"] == "done"
    evals = [m for m in read_metrics(straight / "metrics.jsonl") if m.get("phase") == "eval"]
    assert [m["step"] for m in evals] == [6, 12] and all(0 < m["eval_loss"] < 20 for m in evals)

    assert main(["export", str(stopped), "--to-hf"]) == 0
    exported = stopped / "exports" / f"iter_{ITERS:07d}-hf"
    assert f"-> {exported}" in capsys.readouterr().out
    assert_trained_export(moe_dir, exported)


def assert_trained_export(base: Path, exported: Path) -> None:
    """Every weight moved, and the exported model fits the training data better than the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcqwen.megatron.convert import HfWeights

    before, after = HfWeights(base), HfWeights(exported)
    assert sorted(before.names) == sorted(after.names)
    assert all(not torch.equal(before.get(k).to(torch.bfloat16), after.get(k)) for k in before.names)
    tok = AutoTokenizer.from_pretrained(str(exported))
    rows = [json.loads(line) for line in (REPO / "jobspecs/data/sft-tiny.jsonl").read_text().splitlines()[:8]]
    ids = [tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"] for r in rows]

    def loss(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            return sum(model(torch.tensor([x]), labels=torch.tensor([x])).loss.item() for x in ids) / len(ids)

    assert loss(exported) < loss(base) - 0.3


def test_report_to_every_tracker_from_the_metrics_rank(tmp_path: Path, moe_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron logs through its own Logger: the metrics rank also feeds tensorboard, wandb (offline) and
    mlflow (file store), named after the spec, with the job id (issue 13 item 19)."""
    for name in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCQWEN_JOB_ID", "4242")
    folder = run_dir(tmp_path, "tracked", moe_dir, iters=3, extra="  report_to: [tensorboard, wandb, mlflow]\n")
    log = finish(runner(folder))
    assert "Warning:" not in log, log  # megatron-core's and torch's known notices are quieted (issue 13 item 18)
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{folder / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mg-cpu").experiment_id])
    assert run.info.run_name == "mg-cpu" and run.data.tags["hpcqwen.job_id"] == "4242"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert "moe_aux_loss" in run.data.metrics and "eval_loss" not in run.data.metrics
    (wandb_run,) = (folder / "wandb").glob(f"offline-run-*-{folder.name}")
    assert b"slurm-job-4242" in b"".join(p.read_bytes() for p in wandb_run.glob("*.wandb"))
