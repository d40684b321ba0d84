"""Test-only helpers that let megatron-core 0.16.1 run on the CPU (gloo), and tiny-model utilities.

megatron-core hard-codes CUDA in a few places that a CPU forward/backward reaches
(../shared/notes/ml-stack-cpu.md §7); these shims live here, never in hpcqwen:
- `torch.cuda.current_device()`: RoPE moves `inv_freq` there in every forward
  (models/common/embeddings/rotary_pos_embedding.py);
- the model-parallel RNG tracker's `fork()`: DotProductAttention wraps its dropout in it, and the
  tracker cannot hold CUDA RNG states without CUDA;
- megatron's default causal mask is built with `device="cuda"` (transformer/utils.py): tests of
  `DotProductAttention` pass `causal_mask(s)` instead (hpcqwen's `SdpaAttention` needs no mask);
- `torch.cuda.synchronize()`: `dist_checkpointing.save` calls it.
`apply_training_shims` goes further, for the CPU smoke run of the whole runner (DDP, the
DistributedOptimizer, Megatron's schedule, checkpoint save/resume): `device="cuda"` in tensor
factories becomes the CPU, `Tensor.cuda()` is the identity, `Tensor.type()` reports `torch.cuda.*`
names (the DistributedOptimizer accepts only those), and CUDA streams / memory statistics are stubs.
The MoE `alltoall` dispatcher creates a `torch.cuda.Stream` when it is built, so CPU tests build
with `dispatcher="allgather"` (the dispatcher holds no weights).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_SAVED: dict[str, Any] = {}


def apply_cpu_shims() -> None:
    """Patch the CUDA calls above (idempotent; undone by `remove_cpu_shims`)."""
    if _SAVED:
        return
    _SAVED["current_device"] = torch.cuda.current_device
    _SAVED["synchronize"] = torch.cuda.synchronize
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


def apply_training_shims() -> None:
    """`apply_cpu_shims` plus what DDP, the DistributedOptimizer and the schedule need on CPU.

    Only for a dedicated subprocess (tests/megatron_runner_cpu.py): never undone.
    """
    from megatron.core.tensor_parallel import random as mrandom

    apply_cpu_shims()

    def on_cpu(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)
        return call

    for name in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    plain_type = torch.Tensor.type

    def cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = plain_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_type  # type: ignore[method-assign,assignment]
    torch.cuda.Stream = lambda *a, **k: None  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: None  # type: ignore[assignment]
    for name in ("reset_peak_memory_stats", "empty_cache", "set_device"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()  # type: ignore[method-assign]


@contextlib.contextmanager
def tensor_cuda_is_identity() -> Iterator[None]:
    """`Tensor.cuda()` returns the tensor itself for a block: GPTModel's tied-embedding set-up with
    pipeline parallelism moves the weight with `.cuda()` (language_module.py)."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = saved  # type: ignore[method-assign]


def remove_cpu_shims() -> None:
    """Restore torch.cuda."""
    if _SAVED:
        torch.cuda.current_device = _SAVED.pop("current_device")
        torch.cuda.synchronize = _SAVED.pop("synchronize")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo() -> None:
    """The default process group: torchrun's environment, or a world of one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    dist.init_process_group("gloo")


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """(Re)initialise megatron's parallel state on gloo, with a no-op RNG tracker fork."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    apply_cpu_shims()
    init_gloo()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    mrandom.initialize_rng_tracker()
    mrandom.get_cuda_rng_tracker().fork = lambda name=None: contextlib.nullcontext()


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel(tp: int = 1, pp: int = 1, ep: int = 1) -> Iterator[None]:
    """`init_parallel` for the duration of a block (the process group stays)."""
    from megatron.core import parallel_state as ps

    init_parallel(tp, pp, ep)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


def causal_mask(seq: int) -> torch.Tensor:
    """Megatron's boolean causal mask (True = masked), built on the CPU."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocabulary-parallel logits [b, s, V/tp] gathered to [b, s, V] over the TP group."""
    from megatron.core import parallel_state as ps

    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def cpu_options(**overrides: Any) -> Any:
    """`BuildOptions` for CPU tests: fp32, CPU init, allgather dispatcher."""
    from hpcqwen.megatron.model import BuildOptions

    fields: dict[str, Any] = dict(dtype=torch.float32, cpu=True, dispatcher="allgather")
    fields.update(overrides)
    return BuildOptions(**fields)


def build_moe(out: Any, tokenizer_dir: Any, router_std: float = 0.5, **overrides: Any) -> Any:
    """A tiny random Qwen3-MoE with decisive routing: router weights from N(0, router_std), so a wrong
    routing rule (normalised vs plain top-k) changes the logits far beyond float noise
    (../shared/notes/mcore-gpu.md §3: 6e-3 relative)."""
    from transformers import AutoModelForCausalLM

    from hpcqwen.testing import build_tiny_qwen3

    folder = build_tiny_qwen3(out, tokenizer_dir, moe=True, **overrides)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, router_std)
    model.save_pretrained(str(folder))
    return folder
