"""The numbers of a Qwen3 / Qwen3-MoE architecture, read from a Hugging Face `config.json`.

Pure Python (no torch, no transformers), so the login node can check parallel sizes against the
model before `sbatch`. transformers 5 writes `rope_parameters: {rope_theta: ...}` where 4.x wrote
`rope_theta`, and `num_local_experts` where the hub's Qwen3-MoE configs say `num_experts`: both
spellings are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_TYPES = ("qwen3", "qwen3_moe")
# Megatron-LM's --make-vocab-size-divisible-by default: the embedding rows are padded to a multiple
# of this × the tensor-parallel size so each rank holds an equal, aligned slice.
VOCAB_DIVISIBLE_BY = 128


class UnsupportedModel(ValueError):
    """The config describes a model this converter does not handle."""


@dataclass(frozen=True)
class Qwen3Dims:
    """Architecture of a Qwen3 (dense) or Qwen3-MoE model."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        """Qwen3-MoE (some layers route tokens to experts)."""
        return self.num_experts > 0

    def moe_layer_pattern(self) -> list[int]:
        """Megatron's `moe_layer_freq` list: 1 for an expert layer, 0 for a dense one."""
        return [1 if i in self.moe_layers else 0 for i in range(self.num_layers)]

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Embedding rows: the vocabulary rounded up to 128 × TP (Megatron-LM's rule)."""
        multiple = VOCAB_DIVISIBLE_BY * tensor_parallel
        return math.ceil(self.vocab_size / multiple) * multiple


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """`config.json` of a Hugging Face model folder as a dict."""
    return dict(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))


def dims_from_config(cfg: dict[str, Any]) -> Qwen3Dims:
    """Parse a Qwen3 / Qwen3-MoE `config.json` dict.

    Raises:
        UnsupportedModel: For another architecture or a RoPE scaling this converter does not map.
    """
    model_type = str(cfg.get("model_type", ""))
    if model_type not in MODEL_TYPES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported (expected one of {', '.join(MODEL_TYPES)})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        kind = rope.get("rope_type", rope.get("type"))
        raise UnsupportedModel(f"RoPE scaling {kind!r} is not mapped to megatron-core")
    if cfg.get("attention_bias"):
        raise UnsupportedModel("attention_bias: true is not mapped (Qwen3 has no attention biases)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if model_type == "qwen3_moe" else 0
    moe: dict[str, Any] = {}
    if experts:
        step, dense_only = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
        moe = dict(num_experts=experts, moe_topk=int(cfg["num_experts_per_tok"]),
                   moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
                   # transformers' Qwen3MoeDecoderLayer: experts unless listed in mlp_only_layers or off-step
                   moe_layers=tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0))
    return Qwen3Dims(
        model_type=model_type, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg.get("intermediate_size") or 0), vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), **moe)
