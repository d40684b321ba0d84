"""Two megatron-core modules for GPUs without TransformerEngine, plugged in through `ModuleSpec`.

`TorchGroupedMLP` runs all local experts of a MoE layer with two `torch.nn.functional.grouped_mm`
calls. megatron-core 0.16.1's local spec runs them one by one (`SequentialMLP`), and its own
grouped module (`GroupedMLP`) needs the `grouped_gemm` package; `TEGroupedMLP` needs TE. On an
H200, `F.grouped_mm` ran one layer's experts 8.6× faster than the per-expert loop with identical
results (../shared/notes/mcore-gpu.md, §2). The weights are stacked per expert,
`weight1: [experts, 2 × ffn, hidden]` ([gate; up] rows, as `SequentialMLP`'s `linear_fc1`) and
`weight2: [experts, hidden, ffn]`, and `sharded_state_dict` writes the same checkpoint keys and
global shapes as `SequentialMLP`, so a checkpoint of either loads into the other (export uses
`SequentialMLP` on CPU).

`TorchRMSNorm` is torch's RMSNorm with its weight marked for sequence parallelism: megatron's own
torch wrapper (`WrappedTorchNorm`) refuses `sequence_parallel` outright in 0.16.1 ("sequence parallel
not supported by torch LayerNorm") because it does not set the `sequence_parallel` attribute that
makes `finalize_model_grads` sum the weight's gradient over the tensor-parallel group (apex's and
TE's norms set it).

`SdpaAttention` replaces megatron's `DotProductAttention` (which materialises the s × s scores
and cannot take packed sequences): `F.scaled_dot_product_attention(is_causal=True)` for padded
rows, and torch's varlen FlashAttention-2 kernel (`hpcqwen.attention`, the SFT runner's) for
packed rows (`PackedSeqParams`, THD layout). It ignores `attention_mask`: GPT attention is causal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from hpcqwen import attention as varlen


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `grouped_mm`'s backward
    rejects expanded (stride-0) gradients such as the one `out.sum().backward()` produces."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by `offs` (cumulative ends, int32) times `weight[g].T` of their group.

    Args:
        x: `[tokens, k]`, rows sorted by group.
        weight: `[groups, n, k]`.
        offs: `[groups]` int32 cumulative row counts on x's device.

    Returns:
        `[tokens, n]`.
    """
    if x.is_cuda and x.dtype != torch.bfloat16:  # torch's CUDA grouped GEMM is bf16 only (2.13)
        ends = offs.tolist()
        parts = [x[a:b] @ w.t() for a, b, w in zip([0, *ends[:-1]], ends, weight, strict=False)]
        return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
    product = F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    out: torch.Tensor = _ContiguousGrad.apply(product)  # type: ignore[no-untyped-call]
    return out


class TorchGroupedMLP(MegatronModule):  # type: ignore[misc]
    """The local experts of a MoE layer as two grouped GEMMs (SwiGLU), no TransformerEngine."""

    def __init__(self, num_local_experts: int, config: Any, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.add_bias_linear or not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("TorchGroupedMLP implements bias-free SwiGLU experts only (Qwen3-MoE)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        self.expert_parallel = config.expert_model_parallel_size > 1
        ffn = config.moe_ffn_hidden_size // self.tp_group.size()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        shape1, shape2 = (num_local_experts, 2 * ffn, config.hidden_size), (num_local_experts, config.hidden_size, ffn)
        self.weight1 = torch.nn.Parameter(torch.empty(shape1, dtype=config.params_dtype, device=device))
        self.weight2 = torch.nn.Parameter(torch.empty(shape2, dtype=config.params_dtype, device=device))
        if config.perform_initialization:  # only for training from scratch; SFT loads every weight
            config.init_method(self.weight1)
            config.output_layer_init_method(self.weight2)
        for weight, dim in ((self.weight1, 1), (self.weight2, 2)):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)
            # DDP and the optimizer put params with allreduce=False into the expert-parallel buffers,
            # as megatron's own expert linears do (tensor_parallel/layers.py).
            weight.allreduce = not self.expert_parallel  # type: ignore[attr-defined]
        self.register_load_state_dict_post_hook(_drop_sequential_extra_state)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Tokens sorted by local expert -> expert outputs scaled by their routing probabilities."""
        if self.config.moe_apply_probs_on_input:
            raise NotImplementedError("moe_apply_probs_on_input is not supported by TorchGroupedMLP")
        offs = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        h = grouped_matmul(hidden, self.weight1, offs)
        gate, up = torch.chunk(h, 2, dim=-1)
        act = (F.silu(gate) * up * probs.unsqueeze(-1)).to(hidden.dtype)
        return grouped_matmul(act, self.weight2, offs), None

    def backward_dw(self) -> None:
        """Nothing deferred (SequentialMLP / TEGroupedMLP interface)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (),
                           metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint keys, shapes and offsets of `SequentialMLP` (non-singleton layout)."""
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("TorchGroupedMLP writes the non-singleton expert layout only")
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        axis = len(sharded_offsets)
        replica = (0, 0, self.dp_group.rank())
        expert_axis = (axis, ep_rank, ep_size)

        def fc1_build(key: str, t: torch.Tensor, replica_id: Any, flattened_range: Any) -> list[ShardedTensor]:
            # [gate; up] rows: gate shards fill the first half of the global rows, up the second half
            # (megatron.core.transformer.mlp.apply_swiglu_sharded_factory's layout).
            gate, up = torch.chunk(t, 2, dim=1)
            return [ShardedTensor.from_rank_offsets(key, part.contiguous(), *sharded_offsets, expert_axis,
                                                    (axis + 1, rank, 2 * tp_size), replica_id=replica_id,
                                                    prepend_axis_num=axis)
                    for part, rank in ((gate, tp_rank), (up, tp_size + tp_rank))]

        def fc1_merge(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts, dim=1)

        sd: dict[str, Any] = {
            f"{prefix}weight1": ShardedTensorFactory(f"{prefix}experts.linear_fc1.weight", self.weight1, fc1_build,
                                                     fc1_merge, replica),
            f"{prefix}weight2": ShardedTensor.from_rank_offsets(
                f"{prefix}experts.linear_fc2.weight", self.weight2, *sharded_offsets, expert_axis,
                (axis + 2, tp_rank, tp_size), replica_id=replica, prepend_axis_num=axis),
        }
        # SequentialMLP's linears carry an `_extra_state` entry per expert; write the same objects so
        # the checkpoints are interchangeable (as megatron's GroupedMLP does).
        offset = ep_rank * self.num_local_experts
        for local in range(self.num_local_experts):
            g = offset + local
            for mod in ("linear_fc1", "linear_fc2"):
                sd[f"{prefix}expert{g}.{mod}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{mod}._extra_state", (*sharded_offsets, (axis, g, ep_size *
                                                                                     self.num_local_experts)),
                    (0, tp_rank, self.dp_group.rank()))
        return sd


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm usable with sequence parallelism (megatron's norm constructor signature)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"TorchRMSNorm got normalization {config.normalization!r}")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype,
                         device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        # Sequence-parallel ranks see different tokens: finalize_model_grads sums this gradient over TP.
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def _drop_sequential_extra_state(module: Any, incompatible: Any) -> None:
    """The `expert<g>.linear_fc<i>._extra_state` objects written for SequentialMLP compatibility come
    back on load and have no counterpart here: not an error (megatron's GroupedMLP does the same)."""
    for key in [k for k in incompatible.unexpected_keys if ".experts.expert" in k and k.endswith("._extra_state")]:
        incompatible.unexpected_keys.remove(key)


class SdpaAttention(MegatronModule):  # type: ignore[misc]
    """Causal core attention on SDPA, or torch's varlen flash kernel for packed (THD) batches."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs TransformerEngine's attention (transformer_impl)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SdpaAttention is causal only, got {attn_mask_type}")
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        """q [s, b, heads, d], k/v [s, b, groups, d] (THD: [t, heads, d]) -> [s, b, heads × d]."""
        if attention_bias is not None:
            raise ValueError("SdpaAttention takes no attention bias")
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q
            out = _varlen(query, key, value, cu, int(packed_seq_params.max_seqlen_q), self.scale)
            return out.reshape(out.shape[0], -1)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float) -> torch.Tensor:
    """Causal attention per packed sequence (q/k/v [t, heads, d]): flash on CUDA bf16/fp16, else SDPA."""
    kernel = varlen._torch_varlen()
    if kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return varlen._flash(q, k, v, cu, max_len, scale, kernel)
    return varlen._reference(q, k, v, cu, scale)
