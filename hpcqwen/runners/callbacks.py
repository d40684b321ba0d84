"""Trainer callbacks shared by the transformers-based runners (SFT, GRPO).

- `StopCallback`: the signal chain's last link. A stop request (SIGTERM/SIGUSR2/SIGINT, or the STOP
  file: `hpcqwen.stopping`) is checked after every step; the ranks agree (all_reduce MAX over gloo),
  all of them save a checkpoint and leave the loop together; the runner then exits 75. It also
  marks the attempt's progress after its first step.
- `CheckpointCallback`: after every save, the first rank of each node fsyncs the checkpoint (what
  its node wrote), all ranks meet at a barrier, rank 0 writes the completion marker with the
  run's counters, all ranks meet again, and rank 0 prunes old checkpoints in a background thread
  (a slow rmtree of 100 GB must not sit between two collectives). Saving also happens at the last step.
- `MetricsCallback`: rank 0 appends one line per logging step to metrics.jsonl.
- `RunCounters`: tokens seen and training seconds, continued across resumes from the marker.
- `HeartbeatCallback`: the hang watchdog's heartbeat (step and phase, forward time per step; no GPU sync)
  and, only when a test sets them, the test-only fault hooks (`hpcqwen.testing_faults`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hpcqwen import checkpoints, fs, heartbeat, stopping
from hpcqwen.metrics import MetricsWriter
from hpcqwen.paths import TaskPaths
from hpcqwen.runners._shared import peak_memory_gb

FAULTS: Any = None
if os.environ.get("HPCQWEN_TEST_FAULT") or os.environ.get("HPCQWEN_TEST_SAVE_PAUSE_S"):
    from hpcqwen import testing_faults as FAULTS  # noqa: N812 - test-only hooks, imported only when a test sets them
# Test hook, not a knob: seconds every save pauses before its marker (the preemption soak kills a rank there).
TEST_SAVE_PAUSE_S = FAULTS.save_pause_s() if FAULTS is not None else 0.0


class TokenCounter:
    """Wraps a data collator and counts real (non-padding) training tokens on the CPU.

    Trainer's own `include_num_input_tokens_seen` calls `.item()` on a GPU tensor every micro-batch,
    which stalls the CUDA stream; this count costs nothing. A batch's tokens are counted when the
    training loop consumes it (`consume`, once per micro-batch from MetricsCallback), not when it is
    collated: the dataloader collates a batch ahead, and that batch is collated again after a resume.
    Only valid with dataloader_num_workers=0 (the collator must run in the training process); evaluation
    batches do not pass through it (runners/sft.py).
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0
        self.pending: deque[int] = deque()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.collator(features)
        mask = batch.get("attention_mask")
        self.pending.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    def consume(self) -> None:
        """One micro-batch went through the model: count the oldest collated one."""
        if self.pending:
            self.tokens += self.pending.popleft()


class RunCounters:
    """Tokens seen and training seconds over the whole run, resumes included."""

    def __init__(self, counter: TokenCounter | None) -> None:
        self.counter = counter
        self.tokens_offset, self.seconds_offset = 0, 0.0
        self.started = time.monotonic()

    def resume_from(self, marker: dict[str, Any]) -> None:
        """Continue the counters of the checkpoint this run resumes from."""
        self.tokens_offset = int(marker.get("tokens_seen") or 0)
        self.seconds_offset = float(marker.get("train_time_s") or 0.0)

    def tokens(self, state: Any) -> int:
        """Tokens over all ranks since the run began (a collective when counted by TokenCounter)."""
        if self.counter is None:  # Trainer counted (and restores its count from trainer_state.json)
            return int(state.num_input_tokens_seen or 0)
        t = torch.tensor([float(self.counter.tokens)], dtype=torch.float64)
        if stopping.distributed():
            dist.all_reduce(t, group=stopping.cpu_group())
        return self.tokens_offset + int(t.item())

    def seconds(self) -> float:
        """Training seconds since the run began (start-up of each attempt included)."""
        return round(self.seconds_offset + time.monotonic() - self.started, 1)


class StopCallback(TrainerCallback):
    """Save and stop on every rank once any rank has a stop request."""

    def __init__(self, task: TaskPaths, is_rank0: bool) -> None:
        self.task, self.is_rank0 = task, is_rank0
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.is_rank0:
            stopping.mark_progress(self.task.progress)
        if stopping.agree(stopping.requested(self.task.stop)):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointCallback(TrainerCallback):
    """Durable saves with completion markers, pruning off the training thread, a save at the last step."""

    def __init__(self, root: Path, keep: int | None, is_rank0: bool, counters: RunCounters) -> None:
        self.root, self.keep, self.is_rank0, self.counters = root, keep, is_rank0, counters
        self.pruner = checkpoints.Pruner()
        self._save_started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        if control.should_save:
            self._save_started = time.monotonic()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        path = checkpoints.checkpoint_dir(self.root, state.global_step)
        if os.environ.get("LOCAL_RANK", "0") == "0" and path.is_dir():
            fs.fsync_tree(path)  # NFS/Lustre: a client flushes only its own writes, so every node does
        if TEST_SAVE_PAUSE_S:
            time.sleep(TEST_SAVE_PAUSE_S)  # test hook only: a window to kill a rank mid-save (bench soak)
        stopping.barrier()
        tokens = self.counters.tokens(state)  # a collective: every rank takes part
        if self.is_rank0 and path.is_dir():
            checkpoints.mark_complete(path, {"epoch": state.epoch, "max_steps": state.max_steps, "tokens_seen": tokens,
                                             "train_time_s": self.counters.seconds(),
                                             "save_s": round(time.monotonic() - self._save_started, 2)}, synced=True)
        stopping.barrier()
        if self.is_rank0:
            self.pruner.start(self.root, self.keep)
        return control


class MetricsCallback(TrainerCallback):
    """metrics.jsonl lines: step, total_steps, epoch, loss, lr, grad_norm, tokens/s, peak memory."""

    def __init__(self, path: Path, is_rank0: bool, counters: RunCounters, extra_keys: tuple[str, ...] = ()) -> None:
        self.writer = MetricsWriter(path) if is_rank0 else None
        self.extra_keys = extra_keys
        self.counters = counters
        self._last = (time.time(), 0)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.counters.counter is not None:
            self.counters.counter.consume()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.counters.counter is not None:
            self.counters.counter.consume()  # the step's last micro-batch (no on_substep_end for it)
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._last = (time.time(), self.counters.tokens(state))
        if self.writer:
            self.writer.write({"step": state.global_step, "total_steps": state.max_steps, "phase": "train",
                               "tokens_seen": self._last[1], "train_time_s": self.counters.seconds()})
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        tokens = self.counters.tokens(state) if logs else 0  # a collective: every rank takes part
        if self.writer is None or not logs:
            return control
        now = time.time()
        t0, tok0 = self._last
        phase = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        record = {"step": state.global_step, "total_steps": state.max_steps, "epoch": logs.get("epoch"),
                  "phase": phase, "tokens_seen": tokens, "train_time_s": self.counters.seconds()}
        for src, dst in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm"),
                         ("eval_loss", "eval_loss"), ("train_loss", "train_loss")):
            if src in logs:
                record[dst] = logs[src]
        record.update({k: v for k, v in logs.items() if k in self.extra_keys or k.startswith(self.extra_keys)})
        if phase == "train" and "loss" in logs:
            self._last = (now, tokens)
            if now > t0 and tokens > tok0:
                record["tokens_per_s"] = round((tokens - tok0) / (now - t0), 1)
        record["peak_mem_gb"] = peak_memory_gb()
        self.writer.write(record)
        return control


class HeartbeatCallback(TrainerCallback):
    """Progress for the watchdog (`hpcqwen.heartbeat`): phases from the Trainer's events and the model's forward
    hooks; a training forward's time is this rank's work (straggler detection). Put it LAST in the callback
    list: at `on_step_end` it must see the `should_save` the other callbacks set (save extends the allowance)."""

    def __init__(self, no_grad_phase: str = "eval") -> None:
        self.no_grad_phase = no_grad_phase  # a forward without gradients: evaluation (SFT) or rollouts (GRPO)
        self.slow = FAULTS.slow_factor() if FAULTS is not None else 1.0
        self._t0: float | None = None

    @staticmethod
    def beat(phase: str, step: int | None = None, force: bool = False) -> None:
        heartbeat.beat(phase, step, force=force)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is not None and (heartbeat.current() is not None or self.slow != 1.0):
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            inner.register_forward_pre_hook(self._before_forward)  # every forward: training, eval, generation
            inner.register_forward_hook(self._after_forward)
        self.beat("data", state.global_step, force=True)
        return control

    def _before_forward(self, module: Any, inputs: Any) -> None:
        training = torch.is_grad_enabled()
        self.beat("forward" if training else self.no_grad_phase)
        self._t0 = time.monotonic() if training else None

    def _after_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if self._t0 is None:
            return
        if self.slow != 1.0:
            time.sleep((self.slow - 1.0) * (time.monotonic() - self._t0))  # test-only: a straggler
        hb = heartbeat.current()
        if hb is not None:
            hb.add_work(time.monotonic() - self._t0)
        self._t0 = None
        self.beat("backward")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.beat("optimizer")
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        hb = heartbeat.current()
        if hb is not None:
            hb.end_step()
        if FAULTS is not None:
            FAULTS.maybe_hang(state.global_step)  # test-only: this rank stops before the step's collectives
        phase = "save" if control.should_save and not control.should_evaluate else \
            "eval" if control.should_evaluate else "data"
        self.beat(phase, state.global_step)
        return control

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.beat("save" if control.should_save else "data", state.global_step)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.beat("data", state.global_step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.beat("finishing", state.global_step, force=True)
        return control
