"""`attn_impl: flash_attn` without flash-attn: the registered varlen attention keeps packed sequences
apart (on CPU through its exact per-sequence path; the CUDA kernel is exercised in bench/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpcqwen.attention import NAME, register, varlen_attention_forward
from hpcqwen.data import PackedCollator

pytestmark = pytest.mark.cpu_train


def test_reference_path_equals_sdpa_per_sequence_with_gqa() -> None:
    torch.manual_seed(0)
    lens = [5, 9, 3]
    q, k, v = torch.randn(1, 4, 17, 8), torch.randn(1, 2, 17, 8), torch.randn(1, 2, 17, 8)
    cu = torch.tensor([0, 5, 14, 17])
    out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=9)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                               enable_gqa=True)
        assert torch.allclose(out[:, sl], ref.transpose(1, 2), atol=1e-6)
        start += n


def test_packed_logits_equal_separate_runs(tiny_qwen3_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir), dtype=torch.float32,
                                                 attn_implementation=NAME).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (7, 12, 4)]
    batch = PackedCollator(return_flash_attn_kwargs=True)([{"input_ids": s, "labels": s} for s in seqs])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                       max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"]).logits[0]
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    with torch.no_grad():  # without the sequence boundaries the later sequences would see the earlier ones
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(mixed, torch.cat(alone), atol=1e-3)
