"""HF <-> megatron-core conversion for Qwen3 and Qwen3-MoE on the CPU (gloo), no TransformerEngine.

The converted model's logits equal transformers' (fp32: max |diff| ~3e-7, bound 1e-5) with every
attention / expert module hpcqwen builds, at TP 1 in this process and at TP 2, TP 2 + sequence
parallel and EP 2 in two processes; HF -> mcore -> HF is bit-exact; gradients at TP 2 + SP equal
TP 1's; a dist checkpoint written at TP 2 with grouped experts exports at TP 1 to the original
safetensors. megatron-core's CUDA assumptions are patched by tests/megatron_helpers.py only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from megatron_helpers import (
    build_moe,
    causal_mask,
    cpu_options,
    destroy_parallel,
    free_port,
    init_gloo,
    parallel,
    remove_cpu_shims,
)

pytestmark = pytest.mark.cpu_train
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moe_untied_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Qwen3-MoE as released: untied embeddings, normalised top-k routing (decisive routers)."""
    return build_moe(tmp_path_factory.mktemp("moe-untied") / "model", tiny_tokenizer_dir, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def moe_softmax_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """norm_topk_prob false (transformers' default): the top-k of the softmax over all experts."""
    return build_moe(tmp_path_factory.mktemp("moe-softmax") / "model", tiny_tokenizer_dir, norm_topk_prob=False)


@pytest.fixture(scope="module")
def gloo() -> Iterator[None]:
    """One gloo process group for this module (world of one) and the CPU shims; undone after."""
    init_gloo()
    yield
    destroy_parallel()
    remove_cpu_shims()
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


def converted(model_dir: Path, **opts: object) -> tuple[object, object]:
    from hpcqwen.megatron.convert import load_hf_weights
    from hpcqwen.megatron.dims import dims_from_config, read_config
    from hpcqwen.megatron.model import build_model

    dims = dims_from_config(read_config(model_dir))
    model = build_model(dims, cpu_options(**opts)).eval()
    load_hf_weights(model, model_dir, dims)
    return model, dims


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()(ids).logits


VARIANTS = [("dense", True, False), ("dense", False, False), ("moe_untied", True, True),
            ("moe_untied", False, False), ("moe_softmax", True, True)]


@pytest.mark.parametrize(("model", "flash", "grouped"), VARIANTS,
                         ids=[f"{m}-{'sdpa' if f else 'dotproduct'}-{'grouped' if g else 'sequential'}"
                              for m, f, g in VARIANTS])
def test_logits_equal_transformers_and_round_trip_is_exact(
        gloo: None, request: pytest.FixtureRequest, model: str, flash: bool, grouped: bool) -> None:
    from hpcqwen.megatron.convert import HfWeights, export_hf_state_dict

    model_dir = request.getfixturevalue({"dense": "tiny_qwen3_dir", "moe_untied": "moe_untied_dir",
                                         "moe_softmax": "moe_softmax_dir"}[model])
    with parallel():
        mcore, dims = converted(model_dir, flash_attention=flash, grouped_experts=grouped)
        ids = torch.randint(0, dims.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = mcore(input_ids=ids, position_ids=torch.arange(40).expand(2, -1),
                        attention_mask=None if flash else causal_mask(40))[..., : dims.vocab_size]
        exported = export_hf_state_dict(mcore, dims)
    ref = hf_logits(model_dir, ids)
    assert (out - ref).abs().max().item() < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    disk = HfWeights(model_dir)
    assert sorted(exported) == sorted(disk.names)
    assert all(torch.equal(exported[k], disk.get(k)) for k in disk.names), "HF -> mcore -> HF is not bit-exact"


def test_packed_sequences_attend_only_within_themselves(gloo: None, moe_untied_dir: Path) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    with parallel():
        mcore, dims = converted(moe_untied_dir)
        g = torch.Generator().manual_seed(3)
        seqs = [torch.randint(0, dims.vocab_size, (1, n), generator=g) for n in (13, 19)]
        cu = torch.tensor([0, 13, 32], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=19,
                                 max_seqlen_kv=19)
        ids = torch.cat(seqs, dim=1)
        positions = torch.cat([torch.arange(13), torch.arange(19)])[None]
        with torch.no_grad():
            out = mcore(input_ids=ids, position_ids=positions, attention_mask=None,
                        packed_seq_params=packed)[..., : dims.vocab_size]
    ref = torch.cat([hf_logits(moe_untied_dir, s) for s in seqs], dim=1)
    assert (out - ref).abs().max().item() < 1e-5


def test_qwen3_moe_becomes_this_megatron_config(gloo: None, moe_softmax_dir: Path) -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from hpcqwen.megatron.modules import SdpaAttention, TorchGroupedMLP, TorchRMSNorm

    with parallel():
        mcore, dims = converted(moe_softmax_dir)
    c = mcore.config
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (4, 2, 32)
    assert c.moe_router_pre_softmax and c.moe_router_score_function == "softmax"  # norm_topk_prob false
    assert c.moe_router_dtype == "fp32" and c.moe_layer_freq == [1, 1]
    assert (c.num_query_groups, c.kv_channels, c.qk_layernorm, c.gated_linear_unit) == (2, 32, True, True)
    assert c.layernorm_epsilon == 1e-6 and c.calculate_per_token_loss
    assert mcore.rotary_pos_emb.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 32))  # rope_theta 1e6
    assert mcore.share_embeddings_and_output_weights  # the fixture's tie_word_embeddings
    layer = mcore.decoder.layers[0]
    assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.experts, TorchGroupedMLP)
    assert isinstance(layer.self_attention.core_attention, SdpaAttention)
    assert isinstance(layer.input_layernorm, TorchRMSNorm) and isinstance(mcore.decoder.final_layernorm, TorchRMSNorm)


@pytest.mark.cpu_dist
def test_tp2_sp_ep2_in_two_processes_and_tp2_checkpoint_exports_at_tp1(
        gloo: None, tmp_path: Path, moe_untied_dir: Path, tiny_qwen3_dir: Path) -> None:
    from hpcqwen.megatron import checkpoint
    from hpcqwen.megatron.convert import HfWeights

    out, ckpt_root = tmp_path / "results.json", tmp_path / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(TESTS / "megatron_worker.py"), str(out),
                           str(ckpt_root), str(moe_untied_dir), str(tiny_qwen3_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    assert len(results) == 9  # MoE: TP 2, TP 2 + SP, EP 2, grads, PP 2; dense: TP 2, TP 2 + SP, grads, PP 2
    for r in results:
        if "pp" in r:
            assert r["disjoint"] and r["round_trip_exact"], r
        elif "grads" in r:
            assert r["same_names"] and r["max_rel_diff"] < 1e-4, r
        else:
            assert r["max_abs_diff"] < 1e-5 and r["round_trip_exact"], r
    ckpt = checkpoint.latest_complete(ckpt_root)
    assert ckpt is not None and checkpoint.read_meta(ckpt)["tensor_model_parallel_size"] == 2
    exported = checkpoint.export_hf(ckpt, tmp_path / "exported")
    a, b = HfWeights(moe_untied_dir), HfWeights(exported)
    assert sorted(a.names) == sorted(b.names)
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.names)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert (exported / "tokenizer.json").is_file()
