"""The memory estimate per GPU against peaks measured on an H200 (bench/RESULTS.md), and the check built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen.preflight.memory import GIB, TOLERANCE, ModelShape, TrainSetup, estimate_grpo, estimate_training
from hpcqwen.preflight.report import Report
from hpcqwen.preflight.sizing import check_disk, check_memory
from hpcqwen.spec import load_spec

# The real Qwen3 configs (hub config.json fields that memory depends on); the bench used random models of these.
QWEN3 = {
    "8b": {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936, "tie_word_embeddings": False},
    "1.7b": {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": True},
    "0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936, "tie_word_embeddings": True},
}
# (case, shape, setup, GiB measured: bench/RESULTS.md, "peak GiB (ours)")
PEAKS = [
    ("Qwen3-8B LoRA r8, 8 packs of 2048, flash_attn, Liger, GC", "8b",
     TrainSetup("lora", 2, 1, "", 8, 0.0, 8, 2048, True, True, "flash_attn", True), 24.3),
    ("Qwen3-1.7B full, 16 × 2048, sdpa, Liger, no GC", "1.7b",
     TrainSetup("full", 2, 1, "", 8, 0.0, 16, 2048, False, True, "sdpa", False), 72.2),
    ("Qwen3-1.7B full, ZeRO-3 on 2 GPUs, 4 packs of 2048, GC", "1.7b",
     TrainSetup("full", 2, 2, "zero3", 8, 0.0, 4, 2048, True, True, "flash_attn", False), 17.7),
    ("Qwen3-1.7B full, 8 × 2048, sdpa, Liger, no GC", "1.7b",
     TrainSetup("full", 2, 1, "", 8, 0.0, 8, 2048, False, True, "sdpa", False), 41.2),
]


def test_parameter_counts_are_qwen3s() -> None:
    counts = {k: ModelShape.from_config(v).params() / 1e9 for k, v in QWEN3.items()}
    assert counts == pytest.approx({"8b": 8.19, "1.7b": 1.72, "0.6b": 0.596}, abs=0.01)


@pytest.mark.parametrize(("case", "model", "setup", "measured"), PEAKS, ids=[p[0] for p in PEAKS])
def test_estimate_is_within_the_stated_tolerance_of_a_measured_peak(case: str, model: str, setup: TrainSetup,
                                                                    measured: float) -> None:
    est = estimate_training(ModelShape.from_config(QWEN3[model]), setup)
    ratio = est.total / GIB / measured
    print(f"\n{case}: estimated {est.describe()} vs {measured} GiB measured ({ratio - 1:+.1%})")
    assert abs(ratio - 1) <= TOLERANCE


def test_grpo_estimate_counts_the_reference_and_is_near_the_measured_peak() -> None:
    shape = ModelShape.from_config(QWEN3["0.6b"])
    setup = TrainSetup("full", 2, 1, "", 8, 0.0, 8, 296, True, False, "sdpa", False)
    est = estimate_grpo(shape, setup, beta=0.04, completion=8 * 256, vllm_share=0.0)
    assert est.parts["reference"] == pytest.approx(shape.params() * 2)
    assert abs(est.total / GIB / 5.95 - 1) <= TOLERANCE  # bench/RESULTS.md GRPO row: 5.95 GiB
    assert "reference" not in estimate_grpo(shape, setup, beta=0.0, completion=256, vllm_share=0).parts


def _model(tmp_path: Path, size: str) -> Path:
    folder = tmp_path / f"qwen3-{size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3[size]))
    return folder


def _spec(write_spec, model: Path, task: str, gpus: int = 1, gpu_gib: float = 80.0, name: str = "spec.yaml"):
    text = (f"name: m\ncluster: {{profile: local, gpu_memory_gib: {{default: {gpu_gib}}}}}\n"
            f"resources: {{gpus_per_node: {gpus}, time_limit_min: 60}}\n"
            f"task: {{kind: sft, model: {model}, dataset: [x.jsonl], torch_dtype: bfloat16, {task}}}\n")
    return load_spec(write_spec(text, name))


def test_a_clear_over_commit_is_an_error_with_the_numbers(write_spec, tmp_path: Path) -> None:
    model = _model(tmp_path, "8b")
    report = Report()
    check_memory(_spec(write_spec, model, "train_type: full, max_length: 4096, per_device_train_batch_size: 4, "
                                          "gradient_checkpointing: false"), [""], report)
    (error,) = report.errors
    assert error.key == "resources.gpus_per_node" and error.message.startswith("does not fit: estimated weights 15.3")
    assert "against 79.0 GiB usable of 80 GiB (the profile's default)" in error.message
    assert error.hint == "set gradient_checkpointing: true, or lower per_device_train_batch_size"
    fine = Report()
    check_memory(_spec(write_spec, model, "train_type: lora, max_length: 2048", name="lora.yaml"), [""], fine)
    assert not fine.errors and not fine.warnings and fine.passed[0].startswith("memory: estimated weights 15.3")


def test_near_the_limit_warns(write_spec, tmp_path: Path) -> None:
    model = _model(tmp_path, "8b")
    report = Report()
    check_memory(_spec(write_spec, model, "train_type: lora, max_length: 2048", gpu_gib=18.0), [""], report)
    assert not report.errors and report.warnings[0].message.startswith("close to the limit: estimated")


def test_checkpoints_that_would_fill_the_disk_are_refused(write_spec, tmp_path: Path) -> None:
    model = _model(tmp_path, "8b")
    report = Report()
    check_disk(_spec(write_spec, model, "train_type: full, save_total_limit: 100000"), report)
    (error,) = report.errors
    assert error.key == "task.save_total_limit" and "checkpoints would fill the disk" in error.message
    assert "(8.19 B parameters)" in error.message  # 16 GB weights + 33 GB Adam states per checkpoint
    ok = Report()
    check_disk(_spec(write_spec, model, "train_type: lora, save_total_limit: 2", name="lora.yaml"), ok)
    assert ok.passed[0].startswith("checkpoint space: 0.79 GB for 2 + 1 checkpoints of 0.26 GB × 1 task(s)")
