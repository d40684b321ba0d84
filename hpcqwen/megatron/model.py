"""Qwen3 / Qwen3-MoE as megatron-core `GPTModel`s: config, layer specs and the model.

Qwen3 in Megatron terms: RMSNorm (eps from the config), QK-norm (`qk_layernorm`, RMSNorm over
each head), GQA (`num_query_groups`), SwiGLU (`gated_linear_unit` + SiLU), no biases, RoPE on the
whole head (`rotary_percent` 1, not interleaved) with θ from the config, tied or untied
embeddings. Qwen3-MoE adds a softmax top-k router whose k probabilities are renormalised when
`norm_topk_prob` is true (Megatron: top-k of the logits, then softmax over the k,
`moe_router_pre_softmax=False`) or taken from the softmax over all experts when it is false
(`moe_router_pre_softmax=True`); there is no shared expert.

With TransformerEngine installed (`use_te`), megatron's TE spec is used as it is (TEGroupedMLP for
`moe_grouped_gemm`). Without it, the local spec with every fusion that needs TE/apex turned off,
and three substitutions (`hpcqwen.megatron.modules`): `TorchRMSNorm` for every norm (megatron's
torch norm refuses sequence parallelism), `SdpaAttention` for `use_flash_attn`, and
`TorchGroupedMLP` for `moe_grouped_gemm`.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hpcqwen.megatron.dims import Qwen3Dims

FUSIONS_OFF = dict(masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                   apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)


def te_available() -> bool:
    """TransformerEngine is importable."""
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class BuildOptions:
    """How to build the model: parallel sizes, precision, kernels, recompute."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    dtype: torch.dtype = torch.bfloat16
    use_te: bool = False
    flash_attention: bool = True
    grouped_experts: bool = True
    dispatcher: str = "alltoall"  # "allgather" on CPU: alltoall makes a torch.cuda.Stream at build
    moe_aux_loss_coeff: float = 0.0
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    cross_entropy_loss_fusion: bool = False
    cpu: bool = False
    init_weights: bool = False  # random init (training from scratch); False when weights are loaded
    extra: dict[str, Any] = field(default_factory=dict)


def transformer_config(dims: Qwen3Dims, opts: BuildOptions) -> Any:
    """The megatron-core `TransformerConfig` of a Qwen3 model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe: dict[str, Any] = {}
    if dims.is_moe:
        moe = dict(num_moe_experts=dims.num_experts, moe_router_topk=dims.moe_topk,
                   moe_ffn_hidden_size=dims.moe_ffn_hidden_size,
                   moe_router_pre_softmax=not dims.norm_topk_prob, moe_router_score_function="softmax",
                   moe_router_dtype="fp32",  # transformers' router takes the softmax in float32
                   moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=opts.moe_aux_loss_coeff,
                   moe_token_dispatcher_type=opts.dispatcher, moe_layer_freq=dims.moe_layer_pattern(),
                   # the local spec's expert module is chosen in layer_spec(); TE's from this flag
                   moe_grouped_gemm=opts.grouped_experts and opts.use_te)
    kwargs: dict[str, Any] = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size or dims.moe_ffn_hidden_size,
        num_attention_heads=dims.num_heads, num_query_groups=dims.num_kv_heads, kv_channels=dims.head_dim,
        normalization="RMSNorm", layernorm_epsilon=dims.rms_norm_eps, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=dims.initializer_range,
        tensor_model_parallel_size=opts.tensor_parallel, pipeline_model_parallel_size=opts.pipeline_parallel,
        expert_model_parallel_size=opts.expert_parallel, context_parallel_size=opts.context_parallel,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.dtype, bf16=opts.dtype == torch.bfloat16, fp16=opts.dtype == torch.float16,
        pipeline_dtype=opts.dtype, use_cpu_initialization=opts.cpu, perform_initialization=opts.init_weights,
        recompute_granularity=opts.recompute_granularity, recompute_method=opts.recompute_method,
        recompute_num_layers=opts.recompute_num_layers,
        # token-averaged loss over the global batch (ms-swift's default for megatron sft)
        calculate_per_token_loss=True,
        cross_entropy_loss_fusion=opts.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl="te" if opts.use_te else "native",
        **moe)
    if not opts.use_te:
        kwargs.update(FUSIONS_OFF)
    kwargs.update(opts.extra)
    return TransformerConfig(**kwargs)


def layer_spec(config: Any, opts: BuildOptions, vp_stage: int | None = None) -> Any:
    """The decoder block spec of this pipeline stage, with the non-TE substitutions."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    from hpcqwen.megatron.modules import SdpaAttention, TorchGroupedMLP, TorchRMSNorm

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=opts.use_te, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    if opts.use_te:
        return block
    block = copy.deepcopy(block)  # the layer specs share submodule objects
    block.layer_norm = TorchRMSNorm
    for layer in block.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = TorchRMSNorm
        attention = sub.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = TorchRMSNorm
        if opts.flash_attention:
            sub.self_attention.submodules.core_attention = SdpaAttention
        if sub.mlp.module is MoELayer:
            if opts.grouped_experts:
                sub.mlp.submodules.experts = ModuleSpec(module=TorchGroupedMLP)
            # The local spec renames `pre_mlp_layernorm.` to `mlp.linear_fc1.layer_norm_` in checkpoints
            # (the TE name of a *dense* layer); TE's MoE layers keep `pre_mlp_layernorm`. Keep it too, so
            # MoE checkpoints match the TE spec's.
            keys = dict(sub.sharded_state_dict_keys_map or {})
            keys.pop("pre_mlp_layernorm.", None)
            sub.sharded_state_dict_keys_map = keys
    return block


def patch_megatron_core() -> None:
    """Work around megatron-core 0.16.1 bugs that hit every run without TransformerEngine.

    - moe/moe_utils.py imports `te_general_gemm` only inside `try: import transformer_engine`, but
      `RouterGatingLinearFunction` tests `te_general_gemm is not None` unconditionally: without TE
      every MoE router forward raises `NameError: name 'te_general_gemm' is not defined`.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_model(dims: Qwen3Dims, opts: BuildOptions, *, padded_vocab_size: int | None = None,
                pre_process: bool | None = None, post_process: bool | None = None) -> Any:
    """A `GPTModel` for this rank's pipeline stage (parallel state must be initialized).

    `padded_vocab_size` overrides the TP-dependent padding: a checkpoint written at one TP size
    keeps its embedding shape when it is loaded at another (export).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    patch_megatron_core()
    config = transformer_config(dims, opts)
    theta = dims.rope_theta
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(config, opts),
        vocab_size=padded_vocab_size or dims.padded_vocab_size(opts.tensor_parallel),
        max_sequence_length=dims.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True, share_embeddings_and_output_weights=dims.tie_word_embeddings,
        position_embedding_type="rope", rotary_percent=1.0,
        rotary_base=int(theta) if float(theta).is_integer() else theta)
