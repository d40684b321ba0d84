"""What one row of `hpcqwen queue` holds: a run (a plain job, or a whole array collapsed) and its array
tasks, with training progress; `array_state` folds an array's task states into one. Built by
`monitor.fetch_rows` (and `pipeline.rows` for pipelines), drawn by `monitor_view`."""

from __future__ import annotations

from dataclasses import dataclass

from hpcqwen import slurm
from hpcqwen.progress import Progress


@dataclass(frozen=True)
class TaskRow:
    """One array task."""

    task_id: int
    job_id: str
    slurm_state: str
    reason: str = ""
    elapsed_s: float | None = None
    progress: Progress | None = None
    checkpoint_step: int | None = None
    checkpoint_at: float | None = None
    restarts: int = 0
    label: str = ""  # a pipeline stage's name (shown instead of "task N")
    gpu_hours: float | None = None
    alert: str = ""  # the hang watchdog's word while it runs (hpcqwen.watchview)


@dataclass(frozen=True)
class RunRow:
    """One run (a run dir): a plain job, or a whole array collapsed, with its training progress."""

    name: str
    job_id: str  # "123"; several ids when an array was split ("123,140")
    run_dir: str | None
    slurm_state: str  # verbatim; for an array the state that matters most (see array_state)
    reason: str = ""
    dependency: str = ""
    user: str = ""
    nodes: int = 0
    gpus_per_node: int = 0
    nodelist: str = ""
    elapsed_s: float | None = None
    elapsed_at: float | None = None  # set while running: the elapsed time ticks on from here
    time_limit_s: float | None = None
    restarts: int = 0
    progress: Progress | None = None
    checkpoint_step: int | None = None
    checkpoint_at: float | None = None
    tasks: tuple[TaskRow, ...] = ()
    array_size: int | None = None
    source: str = "squeue"  # squeue | sacct | local | none
    submitted_at: float | None = None
    gpu_hours: float | None = None  # hpcqwen.pipeline.rows: cost.json, else elapsed × GPUs
    note: str = ""  # a pipeline's blocked-on or running stages
    alert: str = ""  # the hang watchdog's word while it runs: STALLED, stragglers (hpcqwen.watchview)

    @property
    def state(self) -> slurm.JobState:
        """The folded state."""
        return slurm.SLURM_STATES.get(self.slurm_state, slurm.JobState.UNKNOWN)

    @property
    def is_array(self) -> bool:
        """An array (its tasks are in `tasks`)."""
        return self.array_size is not None or bool(self.tasks)

    def elapsed_now(self, now: float) -> float | None:
        """Elapsed seconds at `now` (ticking for running jobs, whatever the data's age)."""
        if self.elapsed_s is None:
            return None
        return self.elapsed_s + (max(0.0, now - self.elapsed_at) if self.elapsed_at else 0.0)


ARRAY_PRIORITY = ["RUNNING", "COMPLETING", "CONFIGURING", "PENDING", "REQUEUED"]


def array_state(states: list[str]) -> str:
    """The state that describes a whole array: running beats pending; all done is COMPLETED;
    otherwise the first task state that is not COMPLETED (FAILED, TIMEOUT, an unknown one...)."""
    for s in ARRAY_PRIORITY:
        if s in states:
            return s
    return next((s for s in states if s != "COMPLETED"), "COMPLETED" if states else "UNKNOWN")
