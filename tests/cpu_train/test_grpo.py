"""The GRPO runner on a tiny real Qwen3 through the real launcher (local backend): TRL's GRPOTrainer,
transformers generation, real math-verify accuracy plus a plugin reward, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpcqwen.cli import main
from hpcqwen.metrics import read_metrics

pytestmark = pytest.mark.cpu_train
REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobspecs" / "qwen3-tiny-grpo.yaml"
REWARD_KEYS = {"reward", "reward_std", "reward_mean", "rewards/accuracy/mean", "rewards/accuracy/std",
               "rewards/brevity/mean", "rewards/brevity/std", "completions/mean_length",
               "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean", "loss", "grad_norm", "lr"}


def submit(capsys: pytest.CaptureFixture[str], model: Path, *sets: str, wait: bool = True) -> tuple[Path, str]:
    """`hpcqwen submit jobspecs/qwen3-tiny-grpo.yaml --backend local` on one process of this machine."""
    base = [f"task.model={model}", "resources.nproc_per_node=1", "task.per_device_train_batch_size=4",
            "task.weight_decay=0.0"]
    argv = ["submit", str(SPEC), "--backend", "local", *(["--wait"] if wait else [])]
    rc = main(argv + [x for s in (*base, *sets) for x in ("--set", s)])
    out, err = capsys.readouterr()
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    assert rc == 0, err + log[-3000:]
    return run_dir, out.split("submitted job ")[1].split()[0]


def test_full_grpo_changes_every_parameter_and_logs_rewards(tiny_qwen3_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = submit(capsys, tiny_qwen3_dir, "task.max_steps=3", "task.save_steps=3")
    start = load_file(str(tiny_qwen3_dir / "model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors"))
    assert set(final) == set(start)
    assert [k for k in final if torch.equal(final[k], start[k])] == []
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert set(m) >= REWARD_KEYS, REWARD_KEYS - set(m)
        assert math.isfinite(m["loss"]) and m["reward_mean"] == m["reward"]
        assert m["rewards/accuracy/mean"] == 0.0  # math-verify graded every (random) completion: wrong, not None
        assert 0 < m["rewards/brevity/mean"] <= 1 and m["reward_std"] > 0  # the plugin gives the advantages
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # beta 0.04: the policy moved off the reference
    lines = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {x["step"] for x in lines} == {1, 2, 3}  # 4 completions per step, once each
    assert set(lines[0]["rewards"]) == {"accuracy", "brevity"} and lines[0]["prompt"][-1]["role"] == "user"
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["phase"] == "done"


def initial_adapters(model_dir: Path, rank: int, alpha: int, seed: int = 42) -> dict[str, torch.Tensor]:
    """The adapters GRPOTrainer starts from: it calls set_seed(args.seed), then get_peft_model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, set_seed

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    set_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    return {k: v.clone() for k, v in get_peft_model_state_dict(peft).items()}


def test_lora_grpo_changes_every_adapter(tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = submit(capsys, tiny_qwen3_dir, "task.train_type=lora", "task.lora_rank=4", "task.lora_alpha=16",
                        "task.lora_dropout=0.0", "task.learning_rate=1e-2", "task.max_steps=3", "task.save_steps=3")
    final = load_file(str(run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    start = initial_adapters(tiny_qwen3_dir, rank=4, alpha=16)
    assert set(final) == set(start) and len(final) == 28  # 7 projections × 2 layers × (A, B)
    assert [k for k in final if torch.equal(final[k], start[k])] == []
    kl = [m["kl"] for m in read_metrics(run_dir / "metrics.jsonl") if "kl" in m]
    assert kl[0] == 0.0 and kl[-1] > 0  # reference = the base model with the adapters disabled


def _relaunch(run_dir: Path) -> None:
    """Start the run dir again, as a requeued job would (same run dir, same log in append mode)."""
    log = next((run_dir / "logs").glob("*-local.out"))
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-m", "hpcqwen.localrun", str(run_dir)], check=True, timeout=600,
                       stdout=out, stderr=out)


def test_resume_after_a_kill_continues_from_the_saved_step(tiny_qwen3_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    sets = ("task.max_steps=8", "task.save_steps=2", "task.save_total_limit=1")
    reference, _ = submit(capsys, tiny_qwen3_dir, *sets)
    run_dir, job = submit(capsys, tiny_qwen3_dir, *sets, wait=False)
    marker = run_dir / "checkpoints" / "checkpoint-2" / "hpcqwen-complete.json"
    end = time.time() + 240
    while not marker.exists():
        assert time.time() < end, "no complete checkpoint-2"
        time.sleep(0.05)
    os.killpg(int(job.removeprefix("local-")), signal.SIGKILL)
    time.sleep(1)
    before = read_metrics(run_dir / "metrics.jsonl")
    killed_at = max(m["step"] for m in before)
    assert killed_at < 8
    _relaunch(run_dir)
    log = next((run_dir / "logs").glob("*-local.out")).read_text()
    resumed = [line for line in log.splitlines() if line.startswith("grpo: resuming from ")]
    assert len(resumed) == 1, log[-2000:]
    saved = int(resumed[0].split("checkpoint-")[1])
    assert 2 <= saved <= killed_at
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 9))  # each step once: later lines dropped
    assert sum(1 for m in lines if m.get("phase") == "train" and "loss" not in m and m["step"] == saved) == 1
    assert lines[-1]["phase"] == "done" and lines[-1]["step"] == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-8"]
    # Same weights as the uninterrupted run: optimizer, scheduler, sampling RNG and data position resumed.
    a = load_file(str(reference / "checkpoints" / "checkpoint-8" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "checkpoint-8" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_stop_file_saves_a_complete_checkpoint_and_stops(tiny_qwen3_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = submit(capsys, tiny_qwen3_dir, "task.max_steps=40", "task.save_steps=100", wait=False)
    end = time.time() + 240
    while not any(m.get("step", 0) >= 1 for m in read_metrics(run_dir / "metrics.jsonl")):
        assert time.time() < end, "training never reached step 1"
        time.sleep(0.05)
    (run_dir / "STOP").touch()  # what the batch script's USR2 trap does
    while not (run_dir / "logs" / "local.rc").exists():
        assert time.time() < end, "the run did not stop"
        time.sleep(0.2)
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["phase"] == "stopped" and 1 <= last["step"] < 40
    assert (run_dir / "checkpoints" / f"checkpoint-{last['step']}" / "hpcqwen-complete.json").is_file()
    assert (run_dir / "logs" / "local.rc").read_text() == "75\n" and (run_dir / "OUTCOME").read_text().startswith(
        "stopped ")


def test_zero3_grpo_on_two_processes(tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's setting: ZeRO-3 shards the policy and the reference model; TRL gathers the
    policy's weights for generation."""
    run_dir, _ = submit(capsys, tiny_qwen3_dir, "resources.nproc_per_node=2", "task.per_device_train_batch_size=2",
                        "task.deepspeed=zero3", "task.max_steps=3", "task.save_steps=3")
    log = next((run_dir / "logs").glob("*-local.out")).read_text()
    assert "grpo: full on 2 processes" in log and "trainable 373,184 of 373,184 parameters" in log
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert len(steps) == 3 and all(math.isfinite(m["loss"]) for m in steps) and steps[-1]["kl"] > 0
    ckpt = run_dir / "checkpoints" / "checkpoint-3"
    assert (ckpt / "hpcqwen-complete.json").is_file() and (ckpt / "global_step3").is_dir()
    assert (ckpt / "model.safetensors").is_file()  # gathered 16-bit weights


def test_a_reward_plugin_that_raises_fails_the_step_naming_itself(tiny_qwen3_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "boom.py"
    plugin.write_text("def boom(completions, **kwargs):\n    raise RuntimeError('no score for you')\n")
    rc = main(["submit", str(SPEC), "--backend", "local", "--wait", "--set", f"task.model={tiny_qwen3_dir}",
               "--set", "resources.nproc_per_node=1", "--set", "task.per_device_train_batch_size=4",
               "--set", f"task.reward_funcs=[accuracy, '{plugin}:boom']", "--set", "task.max_steps=1"])
    out, _ = capsys.readouterr()
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    log = next((run_dir / "logs").glob("*-local.out")).read_text()
    assert rc != 0
    assert f"reward function '{plugin}:boom' raised RuntimeError: no score for you" in log, log[-2000:]


def test_static_cache_generation_runs_and_times_its_rollouts(tiny_qwen3_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The transformers fast path's CPU side (compiled decoding is GPU-only): a static KV cache sized once for
    the longest prompt + max_completion_length, every completion of a step in one generate() call, and the
    rollout time split in metrics.jsonl."""
    run_dir, _ = submit(capsys, tiny_qwen3_dir, "task.max_steps=2", "task.save_steps=2",
                        "task.cache_implementation=static", "task.log_completions=false")
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["loss"]) and m["completions/mean_length"] > 0
        assert 0 < m["rollout/generate_s"] < m["step_time"]  # transformers generate, timed inside the step
        assert "rollout/weight_sync_s" not in m  # no vLLM: nothing to sync
