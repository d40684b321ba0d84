"""The SFT runner on tiny real Qwen3 models, through the real launcher (local backend, torchrun, gloo)."""

from __future__ import annotations

import json
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
DATA = REPO / "jobspecs" / "data" / "sft-tiny.jsonl"


def sft_spec(write_spec, model: Path, name: str, nproc: int = 1, **task: object) -> Path:
    knobs = {"train_type": "lora", "torch_dtype": "float32", "max_steps": 20, "per_device_train_batch_size": 4,
             "learning_rate": 1e-2, "lora_dropout": 0.0, "save_steps": 10, "logging_steps": 2, "max_length": 256,
             "gradient_checkpointing": False, **task}
    lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in knobs.items())
    return write_spec(f"name: {name}\nresources: {{nproc_per_node: {nproc}, time_limit_min: 20}}\n"
                      f"task:\n  kind: sft\n  model: {model}\n  dataset: [{DATA}]\n{lines}", f"{name}.yaml")


def submit(spec: Path, capsys: pytest.CaptureFixture[str], *extra: str, wait: bool = True) -> tuple[Path, str]:
    rc = main(["submit", str(spec), "--backend", "local", *(["--wait"] if wait else []), *extra])
    out, err = capsys.readouterr()
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    assert rc == 0, err + log[-3000:]
    return run_dir, out.split("submitted job ")[1].split()[0]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def learned(curve: list[float], by: float) -> bool:
    """The mean of the last three logged losses is `by` below the mean of the first three."""
    return sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - by


def initial_lora_state(model_dir: Path, rank: int = 8, alpha: int = 32, seed: int = 42) -> dict[str, torch.Tensor]:
    """The adapters the runner starts from: same seed, same config, before any step."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    return {k: v.clone() for k, v in get_peft_model_state_dict(peft).items()}


def test_lora_sft_learns_and_changes_every_adapter(write_spec, tiny_qwen3_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = sft_spec(write_spec, tiny_qwen3_dir, "lora", max_steps=60, learning_rate=5e-3, per_device_train_batch_size=8,
                    lora_rank=16, lora_alpha=64, logging_steps=5)
    run_dir, _ = submit(spec, capsys)
    curve = losses(run_dir)
    # ln(4288) ≈ 8.4 at the start; LoRA on a random 64-wide model moves slowly (no embedding adapters)
    assert len(curve) == 12 and learned(curve, 0.4), curve
    final = load_file(str(run_dir / "checkpoints" / "checkpoint-60" / "adapter_model.safetensors"))
    start = initial_lora_state(tiny_qwen3_dir, rank=16, alpha=64)
    assert set(final) == set(start) and len(final) == 28  # 7 projections × 2 layers × (A, B)
    unchanged = [k for k in final if torch.equal(final[k], start[k])]
    assert unchanged == []
    assert (run_dir / "checkpoints" / "checkpoint-60" / "hpcqwen-complete.json").is_file()
    # export: the merged model's logits equal the adapter model's
    assert main(["export", str(run_dir), "--merge-lora"]) == 0
    merged_dir = run_dir / "exports" / "checkpoint-60-merged"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(merged_dir))("Count to three: one two", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits  # PeftModel wraps `base` in place, so take its logits first
    adapter = PeftModel.from_pretrained(base, str(run_dir / "checkpoints" / "checkpoint-60")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        a, m = adapter(ids).logits, merged(ids).logits
    assert (a - m).abs().max().item() < 1e-5
    assert not torch.allclose(a, before, atol=1e-3)  # the adapters did change the model


def test_full_sft_learns_and_changes_every_parameter(write_spec, tiny_qwen3_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = sft_spec(write_spec, tiny_qwen3_dir, "full", train_type="full", learning_rate=3e-3, weight_decay=0.0,
                    max_steps=20)
    run_dir, _ = submit(spec, capsys)
    curve = losses(run_dir)
    assert learned(curve, 1.0), curve
    start = load_file(str(tiny_qwen3_dir / "model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "checkpoint-20" / "model.safetensors"))
    assert set(final) == set(start)
    assert [k for k in final if torch.equal(final[k], start[k])] == []


def _relaunch(run_dir: Path) -> None:
    """Start the run dir again, as a requeued job would (same run dir, same log in append mode)."""
    log = next((run_dir / "logs").glob("*-local.out"))
    with open(log, "ab") as out:
        rc = subprocess.run([sys.executable, "-m", "hpcqwen.localrun", str(run_dir)], timeout=600,
                            stdout=out, stderr=out).returncode
    assert rc == 0, f"the relaunch ended {rc}:\n{log.read_text()[-6000:]}"


def test_resume_after_a_kill_matches_an_uninterrupted_run(write_spec, tiny_qwen3_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    knobs = {"max_steps": 12, "save_steps": 3, "gradient_accumulation_steps": 3, "lora_dropout": 0.1}
    reference, _ = submit(sft_spec(write_spec, tiny_qwen3_dir, "ref", **knobs), capsys)
    run_dir, job = submit(sft_spec(write_spec, tiny_qwen3_dir, "killed", **knobs), capsys, wait=False)
    marker = run_dir / "checkpoints" / "checkpoint-3" / "hpcqwen-complete.json"
    end = time.time() + 240
    while not marker.exists():
        assert time.time() < end, "no complete checkpoint-3"
        time.sleep(0.05)
    os.killpg(int(job.removeprefix("local-")), signal.SIGKILL)
    time.sleep(1)
    killed_at = max(m["step"] for m in read_metrics(run_dir / "metrics.jsonl"))
    assert killed_at < 12
    _relaunch(run_dir)
    log = (run_dir / "logs" / "killed-local.out").read_text()
    resumed = [line for line in log.splitlines() if line.startswith("sft: resuming from ")]
    assert resumed and int(resumed[-1].split("checkpoint-")[1]) >= 3, log[-2000:]
    a = load_file(str(reference / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"))
    # Same weights after 12 steps: optimizer, scheduler, RNG (dropout) and data position all resumed.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_stop_file_saves_on_every_rank_and_resumes(write_spec, tiny_qwen3_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = sft_spec(write_spec, tiny_qwen3_dir, "stopped", nproc=2, max_steps=40, save_steps=100,
                    gradient_accumulation_steps=4)
    run_dir, job = submit(spec, capsys, wait=False)
    end = time.time() + 240
    while not any(m.get("step", 0) >= 4 for m in read_metrics(run_dir / "metrics.jsonl")):
        assert time.time() < end, "training never reached step 4"
        time.sleep(0.1)
    (run_dir / "STOP").touch()  # what the batch script's USR2 trap does
    end = time.time() + 240
    while not (run_dir / "logs" / "local.rc").exists():
        assert time.time() < end, "the run did not stop"
        time.sleep(0.2)
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["phase"] == "stopped" and 4 <= last["step"] < 40
    ckpt = run_dir / "checkpoints" / f"checkpoint-{last['step']}"  # saved at the stop, not at save_steps
    assert (ckpt / "hpcqwen-complete.json").is_file() and {"rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in ckpt.iterdir()}
    assert (run_dir / "logs" / "local.rc").read_text() == "75\n"  # stopped, resumable
    _relaunch(run_dir)  # removes STOP first, as the batch script does
    final = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert final["phase"] == "done" and final["step"] == 40


def _train_lines(run_dir: Path) -> list[dict[str, object]]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "train" and "loss" in m]


def test_term_to_every_process_saves_and_the_resume_equals_an_uninterrupted_run(
        write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Preemption as Slurm does it: SIGTERM to every process (launcher and both ranks) mid-run. The ranks
    save at the current step and exit 75; the resumed run ends bit-equal to an uninterrupted one, with
    every step logged once and the token count continued."""
    knobs = {"max_steps": 14, "save_steps": 100, "logging_steps": 1, "gradient_accumulation_steps": 2,
             "lora_dropout": 0.1}
    reference, _ = submit(sft_spec(write_spec, tiny_qwen3_dir, "ref2", nproc=2, **knobs), capsys)
    run_dir, job = submit(sft_spec(write_spec, tiny_qwen3_dir, "term", nproc=2, **knobs), capsys, wait=False)
    end = time.time() + 300
    while not any(m.get("step", 0) >= 4 for m in _train_lines(run_dir)):
        assert time.time() < end, "training never reached step 4"
        time.sleep(0.05)
    os.killpg(int(job.removeprefix("local-")), signal.SIGTERM)
    end = time.time() + 240
    while not (run_dir / "logs" / "local.rc").exists():
        assert time.time() < end, "the run did not stop"
        time.sleep(0.2)
    assert (run_dir / "logs" / "local.rc").read_text() == "75\n"
    stopped = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert stopped["phase"] == "stopped" and 4 <= stopped["step"] < 14
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped['step']}" / "hpcqwen-complete.json").is_file()
    assert main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["state"] == "STOPPED"
    assert main(["resume", str(run_dir), "--wait"]) == 0, capsys.readouterr().err
    a = load_file(str(reference / "checkpoints" / "checkpoint-14" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "checkpoint-14" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0  # bit-equal on CPU with gloo
    ref_lines, lines = _train_lines(reference), _train_lines(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 15))  # each step once, none lost
    assert [m["loss"] for m in lines] == [m["loss"] for m in ref_lines]
    assert lines[-1]["tokens_seen"] == ref_lines[-1]["tokens_seen"] > 0  # continued across the resume
    assert lines[-1]["train_time_s"] > lines[stopped["step"] - 1]["train_time_s"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_two_processes(stage: str, write_spec, tiny_qwen3_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = sft_spec(write_spec, tiny_qwen3_dir, stage, nproc=2, train_type="full", deepspeed=stage,
                    learning_rate=3e-3, max_steps=6, save_steps=3, logging_steps=1)
    run_dir, _ = submit(spec, capsys)
    curve = losses(run_dir)
    assert len(curve) == 6 and all(x == x for x in curve) and curve[-1] < curve[0], curve
    ckpt = run_dir / "checkpoints" / "checkpoint-6"
    assert (ckpt / "hpcqwen-complete.json").is_file()
    assert any(p.name.startswith("global_step") for p in ckpt.iterdir())  # DeepSpeed's sharded states
    log = (run_dir / "logs" / f"{stage}-local.out").read_text()
    assert f"ZeRO Stage {stage[-1]}" in log or f"zero_optimization.stage={stage[-1]}" in log or "DeepSpeed" in log
    # Every parameter counted, also when ZeRO-3 leaves each rank only empty placeholders.
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir)).parameters())
    assert f"trainable {n:,} of {n:,} parameters" in log
    assert "sft: chat template: hpcqwen's Qwen3 template" in log  # the run log names the template
    assert "truncation_strategy delete: 0 rows over max_length" in log
    if stage == "zero3":  # gathered 16-bit weights on save: export works without zero_to_fp32
        assert (ckpt / "model.safetensors").is_file()
        assert main(["export", str(run_dir)]) == 0


def test_prepare_builds_the_cache_once_and_training_reuses_it(write_spec, tiny_qwen3_dir: Path, run_root: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = sft_spec(write_spec, tiny_qwen3_dir, "prep", max_steps=4, packing=True)
    assert main(["prepare", str(spec), "--backend", "local", "--wait"]) == 0
    out = capsys.readouterr().out
    prep_dir = Path(out.split("run dir: ")[1].split()[0])
    assert prep_dir.parent.name == "prep-prepare"
    entries = [p for p in (run_root / ".cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "COMPLETE").is_file()
    built_at = (entries[0] / "COMPLETE").stat().st_mtime_ns
    prep_log = (prep_dir / "logs" / "prep-prepare-local.out").read_text()
    assert "data cache ready (prepare only)" in prep_log and "fill" in prep_log  # packing fill ratio logged
    assert not (prep_dir / "checkpoints").exists()  # no training happened
    run_dir, _ = submit(spec, capsys)
    log = (run_dir / "logs" / "prep-local.out").read_text()
    assert f"[{entries[0]}]" in log  # the training read the same entry...
    assert (entries[0] / "COMPLETE").stat().st_mtime_ns == built_at  # ...without building it again


def test_tokens_seen_counts_training_tokens_only_not_evaluation(write_spec, tiny_qwen3_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The same training with and without an evaluation set every 2 steps reports the same tokens_seen."""
    plain = sft_spec(write_spec, tiny_qwen3_dir, "noeval", max_steps=4, save_steps=100)
    evaluated = sft_spec(write_spec, tiny_qwen3_dir, "witheval", max_steps=4, save_steps=100, eval_steps=2,
                         val_dataset=[str(DATA)])
    seen = []
    for spec in (plain, evaluated):
        run_dir, _ = submit(spec, capsys)
        lines = read_metrics(run_dir / "metrics.jsonl")
        seen.append(max(m.get("tokens_seen") or 0 for m in lines))
    assert any("eval_loss" in m for m in lines)  # the second run did evaluate
    assert seen[0] == seen[1] > 0


def test_split_dataset_ratio_trains_on_an_immutable_cache_entry_without_writing_to_it(
        write_spec, tiny_qwen3_dir: Path, run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import immutable, tree_snapshot

    spec = sft_spec(write_spec, tiny_qwen3_dir, "split", max_steps=4, split_dataset_ratio=0.25, eval_steps=2,
                    save_steps=4)
    assert main(["prepare", str(spec), "--backend", "local", "--wait"]) == 0
    capsys.readouterr()
    entries = [p for p in (run_root / ".cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1
    assert not list(entries[0].rglob("cache-*.arrow"))  # the prepare job split for eval too: in memory
    before = tree_snapshot(entries[0])
    with immutable(entries[0]):  # read-only even for root, as another user's entry is for us
        run_dir, _ = submit(spec, capsys)
    assert tree_snapshot(entries[0]) == before
    assert any("eval_loss" in m for m in read_metrics(run_dir / "metrics.jsonl"))


def test_export_push_to_hub_never_writes_the_token(tmp_path: Path, tiny_qwen3_dir: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcqwen import checkpoints

    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir))
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(str(ckpt))
    AutoTokenizer.from_pretrained(str(tiny_qwen3_dir)).save_pretrained(str(ckpt))
    checkpoints.mark_complete(ckpt)
    out = tmp_path / "merged"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["export", str(ckpt), "--merge-lora", "--output", str(out), "--push-to-hub", "me/model"]) == 1
    assert "no hub token in the environment" in capsys.readouterr().err and (out / "config.json").is_file()
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the push fails
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    rc = main(["export", str(ckpt), "--merge-lora", "--output", str(out), "--push-to-hub", "me/model"])
    text = "".join(capsys.readouterr())
    assert rc == 1 and "push to me/model failed" in text and secret not in text
    for path in [*tmp_path.rglob("*"), *Path.home().joinpath(".cache", "huggingface").rglob("*")]:
        try:  # another test process may remove its own cache files meanwhile
            data = path.read_bytes() if path.is_file() and path.stat().st_size < 50_000_000 else b""
        except FileNotFoundError:
            continue
        assert secret.encode() not in data, path
