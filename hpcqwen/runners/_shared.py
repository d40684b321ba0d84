"""Small helpers every runner uses: the frozen spec of this process, ranks, stop handlers, the resume
decision, the end of a run (done or stopped), errors on the node."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen import checkpoints, heartbeat, stopping
from hpcqwen.errors import HpcqwenError
from hpcqwen.metrics import MetricsWriter, drop_after
from hpcqwen.paths import RunPaths, TaskPaths
from hpcqwen.spec import JobSpec, read_frozen_spec


@dataclass(frozen=True)
class RunContext:
    """What a runner needs to know about where it runs."""

    spec: JobSpec
    task: Any  # the task model of this array index
    paths: RunPaths
    task_paths: TaskPaths
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_rank0(self) -> bool:
        """Global rank 0 (writes metrics and markers)."""
        return self.rank == 0


def load_context(run_dir: str) -> RunContext:
    """Read spec.json and the launcher's environment (HPCQWEN_*, RANK/LOCAL_RANK/WORLD_SIZE), and
    catch stop signals from here on (they become a save-and-stop request, `hpcqwen.stopping`)."""
    from hpcqwen.runners.noise import quiet_library_noise

    quiet_library_noise()  # before transformers, datasets and DeepSpeed load
    paths = RunPaths(Path(run_dir))
    spec = read_frozen_spec(paths.spec_json)
    index = os.environ.get("HPCQWEN_ARRAY_TASK_ID") or None
    array_index = int(index) if index is not None else None
    task_dir = os.environ.get("HPCQWEN_TASK_DIR")
    task_paths = TaskPaths(Path(task_dir)) if task_dir else paths.task(array_index)
    stopping.install_handlers(task_paths.stop)
    heartbeat.start_rank(task_paths.dir)  # phase "loading" until the runner's first step (watchdog on only)
    return RunContext(spec, spec.task_for(array_index), paths, task_paths, int(os.environ.get("RANK", "0")),
                      int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def log0(ctx: RunContext, message: str) -> None:
    """Print once (rank 0), flushed, so the Slurm log shows it at once."""
    if ctx.is_rank0:
        print(message, flush=True)


def callback(trainer: Any, name: str) -> Any:
    """The trainer's callback of class `name` (hpcqwen's, added by the runner)."""
    return next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == name)


def resume_point(ctx: RunContext, root: Path) -> Path | None:
    """The checkpoint every rank resumes from (rank 0 picks the newest complete one); rank 0 also
    drops metrics.jsonl lines logged after it, or every step's line when an earlier attempt crashed
    before its first complete checkpoint (those steps run again: each step is logged once)."""
    resume = stopping.agree_resume(lambda: checkpoints.latest_complete(root))
    if ctx.is_rank0:
        dropped = drop_after(ctx.task_paths.metrics, checkpoints.step_of(resume) or 0 if resume else 0)
        if dropped:
            after = resume.name if resume else "the start (no complete checkpoint)"
            print(f"resume: dropped {dropped} metrics lines logged after {after} (those steps run again)", flush=True)
    return resume


def finish_training(ctx: RunContext, trainer: Any, stop: Any, pruner: Any, name: str,
                    extra: dict[str, Any] | None = None) -> int:
    """End of a Trainer run: the last metrics line (done or stopped) and one summary line from rank 0,
    then every rank waits for the others; returns 0 (done) or EXIT_STOPPED (saved, resumable)."""
    heartbeat.beat("finishing", force=True)
    step, total = trainer.state.global_step, trainer.state.max_steps
    stopped = stop.stopped_at is not None and step < total
    pruner.join()
    if ctx.is_rank0:
        phase = "stopped" if stopped else "done"
        MetricsWriter(ctx.task_paths.metrics).write({"step": step, "total_steps": total, "phase": phase,
                                                     **(extra or {})})
        latest = checkpoints.latest_complete(ctx.task_paths.checkpoints)
        print(f"{name}: {phase} at step {step} of {total}; newest complete checkpoint: {latest}", flush=True)
    stopping.barrier()  # nobody leaves (and ends the step for the others) before rank 0 wrote the above
    return stopping.EXIT_STOPPED if stopped else 0


def stop_before_training(ctx: RunContext, name: str) -> bool:
    """A stop request that came during start-up (every rank agrees): nothing new to save."""
    if stopping.agree(stopping.requested(ctx.task_paths.stop)):
        log0(ctx, f"{name}: stop requested during start-up: exiting before the first step (resumable)")
        return True
    return False


def run_main(main: Callable[[str], int | None]) -> None:
    """`if __name__ == "__main__"` body: run, and turn user errors into one clear message."""
    from hpcqwen.runners.noise import quiet_library_noise

    quiet_library_noise()  # before a runner's main imports transformers
    try:
        code = main(sys.argv[1])
    except HpcqwenError as e:
        print(e.render(), file=sys.stderr, flush=True)
        code = e.exit_code
    except Exception:
        traceback.print_exc()
        code = 1
    sys.exit(code or 0)


def peak_memory_gb() -> float:
    """Peak GPU memory of this process in GiB, or its peak RSS on a CPU run."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def train_and_eval(ctx: RunContext, options: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """The task's train rows and eval rows (task.val_dataset, else a split of task.split_dataset_ratio) from
    the shared cache (built once by one process), and the train set's packing stats; SFT and Megatron alike."""
    from hpcqwen.data import prepare_sft_dataset, split_eval

    t = ctx.task
    train = prepare_sft_dataset(t.dataset, **options)
    log0(ctx, train.summary())
    evaluation = prepare_sft_dataset(t.val_dataset, **options).dataset if t.val_dataset else None
    data = train.dataset
    if evaluation is None and t.split_dataset_ratio > 0:
        data, evaluation = split_eval(data, t.split_dataset_ratio, t.seed)
    return data, evaluation, train.stats
