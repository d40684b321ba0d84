"""Megatron checkpoints on the shared filesystem: `iter_<n>/` folders, complete only with a marker.

Layout of `<checkpoint root>/iter_0000200/` (Megatron-LM's folder naming):
- the `dist_checkpointing` files (`*.distcp`, `.metadata`, `common.pt`, `metadata.json`): the
  model, the DistributedOptimizer state (unless `no_save_optim`), the LR scheduler, the iteration
  and, unless `no_save_rng`, every rank's RNG state;
- `hpcqwen-megatron.json`: what a reader needs without the spec (iteration, dtype, padded
  vocabulary, parallel sizes, whether optimizer/RNG are inside);
- `hf/`: config.json, generation_config.json and the tokenizer files of the model, so the folder
  alone exports to Hugging Face (`hpcqwen export --to-hf`);
- `hpcqwen-complete.json`: written last by rank 0 after every node fsynced what it wrote and all
  ranks met at a barrier (`hpcqwen.checkpoints.mark_complete`), the same rule as the SFT runner's.
A complete `iter_<n>` is never deleted to make room for a new save (a save that finds one keeps it
and writes nothing); an incomplete one (a save that died) is replaced. `prune` (rank 0, after the
marker, in the background) keeps `save_total_limit` complete folders and removes crashed saves.

megatron-core 0.16.1 + torch AdamW (no TE/apex) needs three work-arounds to resume
(../shared/notes/mcore-gpu.md §4): the `dp_reshardable` optimizer format (the default
`fully_sharded_model_space` fails at save: "ShardedTensor.flattened_range is not supported"),
dummy optimizer states before building the loading state dict (AdamW has no `step` before its first
step: `assert len(steps) == 1`), and restoring each parameter's Adam `step` after loading (the load
leaves the fresh optimizer's shared step tensor in place, restarting bias correction).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from hpcqwen import checkpoints, fs, stopping
from hpcqwen.modelfiles import HF_FILES

META = "hpcqwen-megatron.json"
HF_DIR = "hf"
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
_ITER_RE = re.compile(r"^iter_(\d+)$")


def iter_dir(root: Path, iteration: int) -> Path:
    """`root/iter_0000200` (seven digits, as Megatron-LM names them)."""
    return root / f"iter_{iteration:07d}"


def iteration_of(path: Path) -> int | None:
    """The iteration of an `iter_<n>` folder name, else None."""
    m = _ITER_RE.match(path.name)
    return int(m.group(1)) if m else None


def latest_complete(root: Path) -> Path | None:
    """The newest `iter_<n>` folder with the completion marker, or None."""
    return checkpoints.latest_complete(root, iteration_of)


def prune(root: Path, keep: int | None) -> list[Path]:
    """Crashed saves older than the newest complete one, and complete ones beyond `keep`."""
    return checkpoints.prune(root, keep, iteration_of)


def read_meta(path: Path) -> dict[str, Any]:
    """`hpcqwen-megatron.json` of a checkpoint folder."""
    return dict(json.loads((path / META).read_text(encoding="utf-8")))


def copy_hf_files(src: Path, dst: Path) -> None:
    """The config and tokenizer files of an HF model folder (whatever of HF_FILES exists)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def rng_state() -> dict[str, Any]:
    """This rank's Python, torch, CUDA and megatron model-parallel RNG states."""
    import random

    import torch
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"random": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import random

    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save(root: Path, iteration: int, model: Any, optimizer: Any, scheduler: Any, *, meta: dict[str, Any],
         hf_dir: Path, save_optim: bool = True, save_rng: bool = True) -> Path | None:
    """Write `iter_<iteration>` collectively (every rank calls it) and mark it complete; None (and
    nothing written) when a complete `iter_<iteration>` is already there."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from hpcqwen.megatron.convert import unwrap

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path = iter_dir(root, iteration)
    started = time.monotonic()
    if stopping.agree(checkpoints.is_complete(path)):
        if rank == 0:
            print(f"megatron: {path} is already a complete checkpoint (another run's, or this run's before a "
                  "resume): kept, not overwritten", flush=True)
        return None
    if rank == 0:
        if path.exists():  # an earlier attempt at this iteration died mid-save: start clean
            shutil.rmtree(path)
        path.mkdir(parents=True)
    stopping.barrier()
    state: dict[str, Any] = {"model": unwrap(model).sharded_state_dict(metadata=SHARDING), "iteration": iteration}
    if save_optim and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=False, metadata=SHARDING)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    dist_checkpointing.save(state, str(path))
    if rank == 0:
        copy_hf_files(hf_dir, path / HF_DIR)
        body = {**meta, "iteration": iteration, "world_size": world, "optimizer": bool(save_optim and optimizer),
                "rng": save_rng}
        (path / META).write_text(json.dumps(body, indent=1) + "\n")
    stopping.barrier()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        fs.fsync_tree(path)  # a client flushes only its own writes: every node its own shards
    stopping.barrier()
    if rank == 0:
        checkpoints.mark_complete(path, {"step": iteration, "iteration": iteration,
                                         "save_s": round(time.monotonic() - started, 2)}, synced=True)
    stopping.barrier()
    return path


def load(path: Path, model: Any, optimizer: Any = None, scheduler: Any = None, *, finetune: bool = False,
         load_rng: bool = True) -> int:
    """Load a checkpoint written by `save` (collective); returns the iteration to continue from.

    Resuming restores the model, the optimizer (when the checkpoint has it), the LR scheduler, the
    iteration and the RNG states (same world size only). `finetune` loads the model weights alone
    and returns 0, as Megatron's `--finetune`.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from hpcqwen.megatron.convert import unwrap

    meta = read_meta(path)
    gpt = unwrap(model)
    state: dict[str, Any] = {"model": gpt.sharded_state_dict(metadata=SHARDING)}
    with_optim = not finetune and optimizer is not None and meta.get("optimizer", False)
    if with_optim:
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner._init_optimizer_states_with_dummy_values()  # work-around B (see module docstring)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True, metadata=SHARDING)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with_rng = not finetune and load_rng and meta.get("rng", False) and meta.get("world_size") == world
    if with_rng:
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    loaded = dist_checkpointing.load(state, str(path))
    with torch.no_grad():  # fp32 main params are views of leaf params (../shared/notes/mcore-gpu.md §4)
        gpt.load_state_dict(loaded["model"])
    if finetune:
        return 0
    if with_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer)
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        set_rng_state(loaded["rng_state"])
    return int(loaded.get("iteration", meta["iteration"]))


def restore_adam_steps(optimizer: Any) -> None:
    """Work-around C: give every torch Adam/AdamW parameter state its group's saved `step`."""
    import torch

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in torch_opt.state.get(p, {}):
                    torch_opt.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def export_hf(path: Path, out: Path) -> Path:
    """Write a complete checkpoint as a Hugging Face model folder, in one CPU process.

    The model is rebuilt at TP = PP = EP = 1 with `SequentialMLP` experts (the checkpoint keys of
    `TorchGroupedMLP` and `SequentialMLP` are the same) and the checkpoint's padded vocabulary;
    `dist_checkpointing` reshards whatever parallel layout wrote it. Needs host memory for the
    whole model in the checkpoint's dtype (2 bytes per parameter in bf16).
    """
    import tempfile
    import warnings

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron.convert import export_hf_state_dict, save_hf_folder
    from hpcqwen.megatron.dims import dims_from_config, read_config
    from hpcqwen.megatron.model import BuildOptions, build_model

    meta = read_meta(path)
    dims = dims_from_config(read_config(path / HF_DIR))
    owns_group = not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron's "Apex/TE not installed" and DCP deprecation notices
        if owns_group:  # a file store: no port to pick
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            ps.initialize_model_parallel()
            opts = BuildOptions(dtype=getattr(torch, meta.get("dtype", "bfloat16")), cpu=True, dispatcher="allgather",
                                grouped_experts=False, flash_attention=True)
            model = build_model(dims, opts, padded_vocab_size=meta.get("padded_vocab_size"))
            load(path, model, finetune=True)
            tensors = export_hf_state_dict(model, dims)
        finally:
            ps.destroy_model_parallel()
            if owns_group:
                dist.destroy_process_group()
    tmp_out = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    save_hf_folder(tensors, tmp_out, path / HF_DIR)
    config = read_config(tmp_out)  # the tensors are in the checkpoint's dtype now
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:  # transformers 5 / 4 names
        config[key] = meta.get("dtype", "bfloat16")
    (tmp_out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out
