"""Trainer callbacks shared by the transformers-based runners (SFT, GRPO).

- `StopFileCallback`: the preemption chain's last link. The batch script touches STOP on USR2;
  every rank checks it after each step, the ranks agree (all_reduce MAX), and all of them save
  a checkpoint and leave the loop together, so the job can exit for requeue.
- `CheckpointCallback`: after every save, all ranks meet at a barrier (every shard and RNG file
  is written), then rank 0 fsyncs the folder, writes the completion marker and prunes old
  checkpoints (never the newest complete one). Saving also happens at the last step.
- `MetricsCallback`: rank 0 appends one line per logging step to metrics.jsonl.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hpcqwen import checkpoints
from hpcqwen.metrics import MetricsWriter

_CPU_GROUP: Any = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _cpu_group() -> Any:
    """A gloo group for small control messages, so no rank waits for its GPU stream (an NCCL
    all_reduce plus `.item()` would stall the CUDA pipeline every step). Collective on first use."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


def _world_max(flag: bool) -> bool:
    """Any rank's flag, agreed by all."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class StopFileCallback(TrainerCallback):
    """Save and stop on every rank once any rank sees the STOP file."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if _world_max(self.stop_file.exists()):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointCallback(TrainerCallback):
    """Completion markers, pruning, and a save at the last step."""

    def __init__(self, root: Path, keep: int | None, is_rank0: bool) -> None:
        self.root, self.keep, self.is_rank0 = root, keep, is_rank0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        _barrier()
        if self.is_rank0:
            path = checkpoints.checkpoint_dir(self.root, state.global_step)
            if path.is_dir():
                checkpoints.mark_complete(path, {"epoch": state.epoch, "max_steps": state.max_steps})
                checkpoints.prune(self.root, self.keep)
        _barrier()
        return control


class MetricsCallback(TrainerCallback):
    """metrics.jsonl lines: step, total_steps, epoch, loss, lr, grad_norm, tokens/s, peak memory."""

    def __init__(self, path: Path, is_rank0: bool, extra_keys: tuple[str, ...] = (),
                 counter: TokenCounter | None = None) -> None:
        self.writer = MetricsWriter(path) if is_rank0 else None
        self.extra_keys = extra_keys
        self.counter = counter
        self._last = (time.time(), 0)

    def _tokens(self, state: Any) -> int:
        if self.counter is None:
            return int(state.num_input_tokens_seen or 0)
        t = torch.tensor([float(self.counter.tokens)], dtype=torch.float64)
        if _distributed():
            dist.all_reduce(t, group=_cpu_group())
        return int(t.item())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._last = (time.time(), self._tokens(state))
        if self.writer:
            self.writer.write({"step": state.global_step, "total_steps": state.max_steps, "phase": "train"})
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        tokens = self._tokens(state) if logs else 0  # a collective: every rank takes part
        if self.writer is None or not logs:
            return control
        now = time.time()
        t0, tok0 = self._last
        self._last = (now, tokens)
        phase = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        record = {"step": state.global_step, "total_steps": state.max_steps, "epoch": logs.get("epoch"),
                  "phase": phase, "tokens_seen": tokens}
        for src, dst in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm"),
                         ("eval_loss", "eval_loss"), ("train_loss", "train_loss")):
            if src in logs:
                record[dst] = logs[src]
        record.update({k: v for k, v in logs.items() if k in self.extra_keys or k.startswith(self.extra_keys)})
        if phase == "train" and "loss" in logs and now > t0 and tokens > tok0:
            record["tokens_per_s"] = round((tokens - tok0) / (now - t0), 1)
        record["peak_mem_gb"] = peak_memory_gb()
        self.writer.write(record)
        return control


class TokenCounter:
    """Wraps a data collator and counts real (non-padding) tokens on the CPU as batches are made.

    Trainer's own `include_num_input_tokens_seen` calls `.item()` on a GPU tensor every micro-batch,
    which stalls the CUDA stream; this count costs nothing. Only valid with
    dataloader_num_workers=0 (the collator must run in the training process).
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.collator(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def peak_memory_gb() -> float:
    """Peak GPU memory of this process, or its peak RSS on a CPU run."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
