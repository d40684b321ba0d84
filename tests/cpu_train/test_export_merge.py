"""`hpcqwen export --merge-lora` on a tiny real Qwen3: merged in float32, saved in the base model's
dtype, and the merged model's logits equal the adapter model's within that dtype's precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hpcqwen import checkpoints
from hpcqwen.cli import main

pytestmark = pytest.mark.cpu_train
# Relative error of one rounding to the dtype (unit roundoff), times a margin for the forward pass.
TOLERANCE = {"bfloat16": 2 ** -8 * 8, "float16": 2 ** -11 * 8, "float32": 1e-5}
IDS = torch.tensor([[5, 17, 256, 1024, 33, 7, 900, 12]])


def _base(tmp_path: Path, tiny_qwen3_dir: Path, dtype: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"base-{dtype}"
    AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir), dtype=getattr(torch, dtype)).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_qwen3_dir)).save_pretrained(str(out))
    return out


def _adapter(tmp_path: Path, base: Path) -> Path:
    """A LoRA checkpoint whose update is large enough to change the logits (B is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(ckpt))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(ckpt))
    checkpoints.mark_complete(ckpt)
    return ckpt


def _logits(model: object) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()  # type: ignore[operator,attr-defined]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_merged_export_keeps_the_base_dtype_and_the_adapter_model_s_logits(
    tmp_path: Path, tiny_qwen3_dir: Path, dtype: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path, tiny_qwen3_dir, dtype)
    ckpt = _adapter(tmp_path, base)
    out = tmp_path / "merged"
    assert main(["export", str(ckpt), "--merge-lora", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}  # noqa: SIM118 - no __iter__
    size = (out / "model.safetensors").stat().st_size
    assert size < (base / "model.safetensors").stat().st_size * 1.05  # not twice the base's size
    # The adapter model (base in float32 + adapters) is the reference the merge must reproduce.
    reference = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base),
                                                                                       dtype=torch.float32), str(ckpt)))
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype="auto"))
    base_only = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32))
    scale = reference.abs().max().item()
    error = (merged - reference).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, (error, scale)
    assert (base_only - reference).abs().max().item() > 10 * error  # the adapters did change the model
