"""Memory per GPU of a training task, estimated from the model's config.json and the spec's knobs.

The estimate is what `torch.cuda.max_memory_allocated` reports at the peak, which for the
transformers Trainer is the end of a forward pass: weights, optimizer states (and gradients when
they persist across accumulated micro-batches), activations, and the loss's logits. Per part:

- weights: parameters × dtype bytes (ZeRO-3: a 1/world shard plus the two largest layers gathered);
- optimizer: torch AdamW keeps two states in the parameters' dtype (full training without
  DeepSpeed); DeepSpeed keeps fp32 master weights and two fp32 states (12 bytes/parameter), over
  the world for ZeRO-2/3, on the CPU with `zero3_offload`, and a 1/world fp32 gradient partition;
  LoRA adapters are fp32 (peft upcasts them): 16 bytes/parameter with gradients and Adam;
- activations per token and layer (bf16; Korthikanti et al. 2022, counted for Qwen3's block):
  8·h + 6·h_q + 6·h_kv + 6·f bytes — the block input and its normalised copy, q/k before and after
  their norms and rotary, v, the attention output, the MLP input, gate, up and their product;
  SiLU's output adds 2·f without Liger's fused SwiGLU; flash/SDPA kernels keep no S² scores (eager
  attention adds 2 bytes × heads × S² per row). Gradient checkpointing keeps only each layer's
  input (2·h) plus one layer recomputed; LoRA dropout > 0 keeps a dropped copy of every adapted
  input;
- logits: tokens × vocab × (dtype + 4 bytes for the fp32 cross-entropy); Liger's fused linear
  cross-entropy keeps only a chunk of them;
- GRPO: a frozen reference copy when beta > 0 (full training; LoRA disables its adapters instead),
  logits over the whole sequence, and a colocated vLLM's share of the GPU (vllm_gpu_memory_utilization,
  released while training when sleep_level > 0).

Checked against bench/RESULTS.md's peaks (tests/unit/test_preflight_memory.py): Qwen3-8B LoRA
packed 16k tokens 24.3 GiB, Qwen3-1.7B full 16 × 2048 72.2 GiB, Qwen3-1.7B ZeRO-3 on 2 GPUs 17.7 GiB.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = float(1 << 30)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
TOLERANCE = 0.15  # the estimate's stated accuracy against measured peaks
CONTEXT_GIB = 1.0  # CUDA context, NCCL buffers and allocator slack that max_memory_allocated does not count


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen3 / Qwen3-MoE config.json that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    experts: int = 0
    moe_ffn: int = 0

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> ModelShape:
        """From a config.json's fields (KeyError when one that matters is missing)."""
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return cls(hidden, int(c["num_hidden_layers"]), heads, int(c.get("num_key_value_heads") or heads),
                   int(c.get("head_dim") or hidden // heads), int(c.get("intermediate_size") or 0),
                   int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)), int(c.get("num_experts") or 0),
                   int(c.get("moe_intermediate_size") or 0))

    @property
    def q_width(self) -> int:
        """Width of the query projection (heads × head_dim)."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of each of the key and value projections."""
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim
        mlp = self.experts * 3 * h * self.moe_ffn + h * self.experts if self.experts else 3 * h * self.ffn
        return attn + mlp + 2 * h

    def params(self) -> int:
        """All parameters (embeddings once when tied)."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * self.layer_params() + self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA parameters with all-linear targets: r × (in + out) per adapted projection."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        ffn = self.moe_ffn * self.experts if self.experts else self.ffn
        per_layer = (h + q) * 2 + (h + kv) * 2 + (h + ffn) * 2 + (ffn + h)
        return self.layers * rank * per_layer

    def activation_bytes(self, liger: bool) -> int:
        """Bytes (bf16) one token keeps for backward in one layer without recompute (see the module docstring)."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        f = self.moe_ffn * 8 if self.experts else self.ffn  # MoE: top-k experts' widths (Qwen3-MoE: 8)
        return 8 * h + 6 * q + 6 * kv + (6 if liger else 8) * f


def read_shape(model: str) -> ModelShape | None:
    """The shape of a local model folder (its config.json), or None (a hub id, a reference, unreadable)."""
    path = Path(model) / "config.json"
    try:
        return ModelShape.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Estimate:
    """Bytes per GPU by part, and what the GPU must leave to others (a colocated vLLM)."""

    parts: dict[str, float] = field(default_factory=dict)
    reserved_fraction: float = 0.0  # of the GPU's memory, taken by a colocated vLLM engine

    @property
    def total(self) -> float:
        """All parts."""
        return sum(self.parts.values())

    def describe(self) -> str:
        """`weights 15.3 + optimizer 0.6 + activations 6.7 = 22.6 GiB`."""
        shown = " + ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GIB)
        return f"{shown} = {self.total / GIB:.1f} GiB"


@dataclass(frozen=True)
class TrainSetup:
    """The knobs of a training task that memory depends on (sft and grpo share them)."""

    train_type: str
    dtype_bytes: int
    world: int
    deepspeed: str
    lora_rank: int
    lora_dropout: float
    rows: int  # sequences per micro-batch
    seq_len: int  # tokens per sequence
    grad_ckpt: bool
    liger: bool
    attn: str
    accumulate: bool


def estimate_training(shape: ModelShape, s: TrainSetup) -> Estimate:
    """Weights, optimizer, gradients and activations per GPU for an SFT-style step."""
    n, b = shape.params(), s.dtype_bytes
    zero3 = s.deepspeed.startswith("zero3")
    est = Estimate()
    gathered = 2 * shape.layer_params() * b + shape.vocab * shape.hidden * b
    est.parts["weights"] = n * b / s.world + gathered if zero3 else n * b
    if s.train_type == "lora":
        est.parts["optimizer"] = 16.0 * shape.lora_params(s.lora_rank)
    elif s.deepspeed:
        offload = s.deepspeed == "zero3_offload"
        est.parts["optimizer"] = 0.0 if offload else 12.0 * n / s.world
        est.parts["gradients"] = 4.0 * n / s.world  # DeepSpeed accumulates bf16 gradients in fp32
    else:
        est.parts["optimizer"] = 2.0 * n * b
        if s.accumulate:
            est.parts["gradients"] = float(n * b)
    est.parts["activations"] = _activations(shape, s)
    est.parts["logits"] = _logits(shape, s.rows * s.seq_len, b, s.liger)
    return est


def _activations(shape: ModelShape, s: TrainSetup) -> float:
    tokens, scale = s.rows * s.seq_len, s.dtype_bytes / 2
    per_layer = shape.activation_bytes(s.liger) * scale
    if s.attn == "eager":  # the scores and probabilities of each head, over the row's S keys
        per_layer += 2 * s.dtype_bytes * shape.heads * s.seq_len
    if s.train_type == "lora" and s.lora_dropout > 0:
        h, q, f = shape.hidden, shape.q_width, shape.ffn
        per_layer += 2 * (5 * h + q + f) * scale
    if s.grad_ckpt:
        return tokens * (shape.layers * 2 * shape.hidden * scale + per_layer)
    return tokens * shape.layers * per_layer


def _logits(shape: ModelShape, tokens: int, b: int, liger: bool) -> float:
    if liger:  # fused linear cross-entropy: chunks of rows, fp32 logits and their gradient
        rows = max(1, math.ceil(tokens / math.ceil(shape.vocab / shape.hidden)))
        chunk = 1 << (rows - 1).bit_length()  # Liger rounds the chunk up to a power of two
        return 2.0 * min(chunk, tokens) * shape.vocab * 4 + tokens * shape.hidden * 4
    return float(tokens * shape.vocab * (b + 4))


def estimate_grpo(shape: ModelShape, s: TrainSetup, *, beta: float, completion: int, vllm_share: float) -> Estimate:
    """An SFT-style step over the completions, plus the reference model and a colocated vLLM's share."""
    est = estimate_training(shape, s)
    if beta > 0 and s.train_type == "full":
        est.parts["reference"] = shape.params() * s.dtype_bytes / (s.world if s.deepspeed.startswith("zero3") else 1)
    # TRL slices the logits to the completion and takes log-softmax per row in fp32.
    est.parts["logits"] = float(s.rows * s.seq_len * shape.vocab * s.dtype_bytes + completion * shape.vocab * 4)
    est.reserved_fraction = vllm_share
    return est
