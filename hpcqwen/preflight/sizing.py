"""Preflight of sizes: memory per GPU against the GPU's memory, disk space for checkpoints, writable roots.

The GPU's memory comes from the profile's `gpu_memory_gib` (Slurm does not know it), by the GRES
type of the partition's nodes that fit the job (the smallest when several fit), or its `default`.
An estimate above the GPU by more than the estimate's tolerance is refused; one within 10 % of
the limit warns. Checkpoint space is parameters × bytes per checkpoint × (save_total_limit + the
one being written) × array tasks, against the free space of the run root's filesystem.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from hpcqwen.preflight.memory import (
    CONTEXT_GIB,
    DTYPE_BYTES,
    GIB,
    TOLERANCE,
    Estimate,
    ModelShape,
    TrainSetup,
    estimate_grpo,
    estimate_training,
    read_shape,
)
from hpcqwen.preflight.report import Report
from hpcqwen.spec import JobSpec
from hpcqwen.stagerefs import is_stage_ref
from hpcqwen.tasks import DistillTask, GrpoTask, SftTask

WARN_FRACTION = 0.9


def local_gpu_gib() -> float | None:
    """GiB of this machine's first GPU (the local backend runs here), or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) / GIB


def gpu_memory_gib(spec: JobSpec, types: list[str], here: bool = False) -> tuple[float | None, str]:
    """(GiB of the smallest GPU among `types`, which one) from the profile's table; with `here` (the
    local backend) this machine's own GPU when it has one; None when unknown."""
    if here and (mine := local_gpu_gib()) is not None:
        return mine, "this machine's GPU"
    table = spec.cluster.gpu_memory_gib
    known = [(table[t], t) for t in types if t in table]
    if known:
        return min(known)
    if "default" in table:
        return table["default"], "the profile's default"
    return None, ""


def task_estimate(spec: JobSpec) -> tuple[Estimate | None, str]:
    """The memory estimate of the spec's task, or None and why there is none."""
    task = spec.task
    if not isinstance(task, (SftTask, GrpoTask)):
        return None, f"no memory estimate for task.kind {task.kind}"
    if is_stage_ref(task.model):
        return None, "the model is an earlier stage's output"
    shape = read_shape(task.model)
    if shape is None:
        return None, f"no config.json to read in {task.model} on this machine"
    setup = _setup(spec, task)
    if isinstance(task, GrpoTask):
        share = task.vllm_gpu_memory_utilization if task.use_vllm and task.vllm_mode == "colocate" \
            and task.sleep_level == 0 else 0.0
        return estimate_grpo(shape, setup, beta=task.beta, completion=task.per_device_train_batch_size
                             * task.max_completion_length, vllm_share=share), ""
    return estimate_training(shape, setup), ""


def _setup(spec: JobSpec, task: SftTask | GrpoTask) -> TrainSetup:
    if isinstance(task, SftTask):
        seq, liger, attn = task.max_length, task.use_liger_kernel, task.attn_impl
    else:
        seq, liger, attn = (task.max_length or 0) + task.max_completion_length, False, "sdpa"
    return TrainSetup(task.train_type, DTYPE_BYTES[task.torch_dtype], spec.world_size, task.deepspeed or "",
                      task.lora_rank, task.lora_dropout, task.per_device_train_batch_size, seq,
                      task.gradient_checkpointing, liger, attn, task.gradient_accumulation_steps > 1)


def check_memory(spec: JobSpec, types: list[str], report: Report, here: bool = False) -> None:
    """The estimate per GPU against the GPU's memory (minus a colocated vLLM's share); `here`: the job
    runs on this machine (local backend), so its own GPU is the one to compare with."""
    if spec.gpus_per_node == 0:
        report.ok("CPU job: no GPU memory to check")
        return
    cap, which = gpu_memory_gib(spec, types, here)
    if isinstance(spec.task, DistillTask):
        _check_engine_memory(spec, spec.task, cap, which, report)
        return
    est, why = task_estimate(spec)
    if est is None or cap is None:
        report.ok("memory per GPU not checked: " + (why or "the GPU's memory is unknown (set gpu_memory_gib "
                                                    "in the cluster profile)"))
        return
    usable = cap * (1 - est.reserved_fraction) - CONTEXT_GIB
    need = est.total / GIB
    vllm = f" after vLLM's {est.reserved_fraction:.0%}" if est.reserved_fraction else ""
    text = (f"estimated {est.describe()} per GPU against {usable:.1f} GiB usable of {cap:g} GiB ({which}){vllm}; "
            f"the estimate is within ±{TOLERANCE:.0%} of measured peaks")
    if need > usable * (1 + TOLERANCE):
        report.error("resources.gpus_per_node", f"does not fit: {text}", got=f"{need:.1f} GiB",
                     expected=f"<= {usable:.1f} GiB", hint=_memory_hint(spec))
    elif need > usable * WARN_FRACTION:
        report.warn("resources.gpus_per_node", f"close to the limit: {text}", hint=_memory_hint(spec))
    else:
        report.ok(f"memory: {text}")


def _memory_hint(spec: JobSpec) -> str:
    task = spec.task
    if isinstance(task, (SftTask, GrpoTask)) and not task.gradient_checkpointing:
        return "set gradient_checkpointing: true, or lower per_device_train_batch_size"
    if isinstance(task, (SftTask, GrpoTask)) and task.train_type == "full" and not task.deepspeed:
        return "use deepspeed: zero3 over more GPUs, or train_type: lora"
    return "lower per_device_train_batch_size or max_length, or use more GPUs with ZeRO-3"


def _check_engine_memory(spec: JobSpec, task: DistillTask, cap: float | None, which: str, report: Report) -> None:
    shape = None if is_stage_ref(task.model) else read_shape(task.model)
    if shape is None or cap is None:
        report.ok("vLLM memory not checked: the model's config.json or the GPU's memory is unknown")
        return
    weights = shape.params() * DTYPE_BYTES[task.torch_dtype] / task.tensor_parallel_size / GIB
    room = cap * task.gpu_memory_utilization
    text = (f"weights {weights:.1f} GiB per GPU (tensor_parallel_size {task.tensor_parallel_size}) in vLLM's "
            f"{room:.1f} GiB ({task.gpu_memory_utilization:.0%} of {cap:g} GiB, {which})")
    if weights > room:
        report.error("task.tensor_parallel_size", f"the model does not fit: {text}", got=f"{weights:.1f} GiB",
                     expected=f"<= {room:.1f} GiB", hint="raise tensor_parallel_size or gpu_memory_utilization")
    elif weights > room * 0.8:
        report.warn("task.gpu_memory_utilization", f"little room for the KV cache: {text}")
    else:
        report.ok(f"memory: {text}")


# ---- disk ---------------------------------------------------------------------------------------

def checkpoint_bytes(task: SftTask | GrpoTask, shape: ModelShape) -> float:
    """Bytes of one checkpoint: weights (or LoRA adapters) and, unless save_only_model, optimizer states."""
    only_model = getattr(task, "save_only_model", False)
    if task.train_type == "lora":
        n = shape.lora_params(task.lora_rank)
        return n * 4.0 + (0 if only_model else 8.0 * n)
    n, b = shape.params(), DTYPE_BYTES[task.torch_dtype]
    optimizer = 12.0 * n if task.deepspeed else 2.0 * n * b
    return n * b + (0 if only_model else optimizer)


def check_disk(spec: JobSpec, report: Report) -> None:
    """Free space of the run root's filesystem for the checkpoints the run keeps."""
    task = spec.task
    root = nearest_existing(Path(spec.cluster.run_root))
    if not isinstance(task, (SftTask, GrpoTask)) or is_stage_ref(task.model):
        return
    shape = read_shape(task.model)
    if shape is None:
        report.ok(f"checkpoint space not checked: no config.json to read in {task.model}")
        return
    kept = task.save_total_limit
    if kept is None:
        steps = task.max_steps
        if steps is None:
            report.warn("task.save_total_limit", "is unset and max_steps is unknown: every checkpoint is kept",
                        hint="set save_total_limit (e.g. 2)")
            return
        kept = math.ceil(steps / task.save_steps)
    tasks = spec.array.count if spec.array else 1
    need = checkpoint_bytes(task, shape) * (kept + 1) * tasks
    free = shutil.disk_usage(root).free
    text = (f"{need / 1e9:.2f} GB for {kept} + 1 checkpoints of {checkpoint_bytes(task, shape) / 1e9:.2f} GB × "
            f"{tasks} task(s) ({shape.params() / 1e9:.2f} B parameters), {free / 1e9:.1f} GB free under {root}")
    if need > free:
        report.error("task.save_total_limit", f"checkpoints would fill the disk: {text}",
                     got=str(task.save_total_limit),
                     hint="lower save_total_limit, set save_only_model (no resume), or free space")
    elif need > 0.8 * free:
        report.warn("task.save_total_limit", f"checkpoints would take most of the free space: {text}")
    else:
        report.ok(f"checkpoint space: {text}")


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def check_roots(spec: JobSpec, report: Report) -> None:
    """run_root and cache_root can be created or written by this user (from the login node)."""
    for key in ("run_root", "cache_root"):
        value = getattr(spec.cluster, key)
        if value is None:
            continue
        base = nearest_existing(Path(value))
        if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
            where = "exists" if base == Path(value) else f"to be made under {base}"
            report.ok(f"cluster.{key} {value} is writable here ({where})")
        else:
            report.error(f"cluster.{key}", f"{value} cannot be made by this user ({base} exists and is not a "
                         "writable folder)", got=value,
                         hint=f"choose a {key} you can write, or ask for access to {base}")
