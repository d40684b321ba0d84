"""Variable-length (packed) attention without the flash-attn package: `attn_impl: flash_attn`.

flash-attn is a CUDA build that many clusters (and our GPU image) do not have. PyTorch ≥ 2.10
ships FlashAttention-2's varlen kernel as `torch.nn.attention.varlen.varlen_attn`; this module
registers it with transformers' AttentionInterface as `hpcqwen_varlen`. Packed rows come from
`PackedCollator(return_flash_attn_kwargs=True)`, whose `cu_seq_lens_q/k` and `max_length_q/k`
reach the attention function through the model's kwargs, so no 4-D mask is ever built (the name
is deliberately not registered as a mask function). On CPU, or where torch has no varlen
kernel, the same function runs SDPA per sequence: slow but exact, which is what the CPU tests use.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "hpcqwen_varlen"


def flash_attn_installed() -> bool:
    """The flash-attn package (transformers' `flash_attention_2`) is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention per sequence (q, k, v: [T, H, D]) with SDPA."""
    out = torch.empty_like(q)
    for a, b in _segments(cu):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
           scale: float, kernel: Any) -> torch.Tensor:
    params = inspect.signature(kernel).parameters
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:  # torch 2.10/2.11
        kwargs["is_causal"] = True
    else:  # torch 2.12+: causal is a window (-1 left, 0 right)
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older kernels want as many KV heads as query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu32 = cu.to(device=q.device, dtype=torch.int32)
    out: torch.Tensor = kernel(q, k, v, cu32, cu32, max_len, max_len, **kwargs)
    return out


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention signature: q/k/v [B, H, T, D] -> ([B, T, H, D], None)."""
    batch, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # one right-padded sequence per row: causal attention never looks at the padding
        cu = torch.arange(0, (batch + 1) * length, length, device=query.device)
        max_len = length
    else:
        if batch != 1:
            raise ValueError(f"packed attention expects one flattened row, got batch {batch}")
        max_len = int(kwargs.get("max_length_q") or length)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    kernel = _torch_varlen()
    can_flash = kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if can_flash and "scale" not in inspect.signature(kernel).parameters and abs(scale - dim**-0.5) > 1e-12:
        can_flash = False  # this torch's kernel has no scale argument
    out = _flash(q, k, v, cu, max_len, scale, kernel) if can_flash else _reference(q, k, v, cu, scale)
    return out.reshape(batch, length, heads, dim), None


def register() -> str:
    """Register the attention function with transformers; returns its attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def implementation(attn_impl: str) -> str:
    """The transformers attn_implementation for a spec's attn_impl."""
    if attn_impl != "flash_attn":
        return attn_impl
    return "flash_attention_2" if flash_attn_installed() else register()
