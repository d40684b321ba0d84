"""The job spec's sections besides the task (resources, array, dependencies, requeue, watchdog), and
`SpecView`: what the task models and the container plan read of a whole spec. This module sits below both
`hpcqwen.tasks` and `hpcqwen.spec`, so a task's cross-checks take the spec they check without importing it
(`hpcqwen.spec.JobSpec` is the one `SpecView` there is)."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from hpcqwen.cluster import ClusterProfile, SlurmName
from hpcqwen.fields import (
    MAX_ARRAY,
    MAX_CPUS,
    MAX_FACTOR,
    MAX_GPUS_PER_NODE,
    MAX_MEM_GB,
    MAX_NODES,
    MAX_PROCS_PER_NODE,
    MAX_RESTARTS,
    MAX_TIME_MIN,
    MAX_WATCH_S,
    SPEC_CONFIG,
)


class Section(BaseModel):
    """A spec section: unknown keys are errors, values are checked as given (`fields.SPEC_CONFIG`)."""

    model_config = SPEC_CONFIG


class Resources(Section):
    """What to ask Slurm for. Fields named after sbatch's long options."""

    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Nodes (sbatch --nodes).")
    gpus_per_node: int | None = Field(None, ge=0, le=MAX_GPUS_PER_NODE,
                                      description="GPUs per node; default: the profile's.")
    nproc_per_node: int | None = Field(
        None, ge=1, le=MAX_PROCS_PER_NODE, description="Processes per node; default: the GPUs per node, or 1 for "
        "CPU jobs."
    )
    cpus_per_task: int | None = Field(
        None, ge=1, le=MAX_CPUS,
        description="CPU cores for each node's launcher; default: profile cpus_per_gpu × GPUs, or 1."
    )
    mem_gb: float | None = Field(None, ge=0.001, le=MAX_MEM_GB,
                                 description="Memory per node in GB (sbatch --mem, rounded up to whole MB).")
    time_limit_min: int = Field(60, ge=1, le=MAX_TIME_MIN, description="Wall-time limit in minutes (sbatch --time).")
    partition: SlurmName | None = Field(None, description="Overrides the profile's partition.")
    account: SlurmName | None = Field(None, description="Overrides the profile's account.")
    qos: SlurmName | None = Field(None, description="Overrides the profile's QOS.")
    constraint: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.,:|&\[\]*()-]+$", max_length=1024, description="Node features (sbatch "
        "--constraint)."
    )
    exclusive: bool = Field(False, description="Whole nodes (sbatch --exclusive).")


class ArraySpec(Section):
    """A Slurm job array: `size` tasks (sharding), or one task per entry of `tasks` (a sweep)."""

    size: int | None = Field(None, ge=1, le=MAX_ARRAY, description="Number of array tasks (0..size-1).")
    throttle: int | None = Field(None, ge=1, le=MAX_ARRAY, description="At most this many tasks run at once (%N).")
    tasks: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Per-task overrides of `task` keys (dotted), e.g. [{learning_rate: 1e-4}, {learning_rate: 1e-5}].",
    )

    @property
    def count(self) -> int:
        """Number of array tasks."""
        return self.size if self.size is not None else len(self.tasks)


class Dependency(Section):
    """Start only after another job (sbatch --dependency)."""

    job: str = Field(description="A Slurm job id (123 or 123_4), or the run dir of an earlier submission.")
    type: Literal["afterok", "afterany", "afternotok", "after"] = Field("afterok", description="Dependency type.")


class Requeue(Section):
    """Preemption, time limit and crash handling: save, requeue, resume (DESIGN.md, the signal chain)."""

    enabled: bool = Field(
        True, description="Requeue a run that stopped to save (time-limit USR2, preemption, scancel --signal=TERM, "
        "scontrol requeue) while restarts remain (sbatch --requeue; Slurm also requeues it after a node failure)."
    )
    max_restarts: int = Field(3, ge=0, le=MAX_RESTARTS,
                              description="Give up after this many restarts (SLURM_RESTART_COUNT).")
    signal_lead_s: int = Field(
        120, ge=10, le=65535, description="Seconds before the time limit that USR2 reaches the batch script; must "
        "cover one training step plus one checkpoint save (checked on submit against the last run of the spec)."
    )
    on_failure: bool = Field(
        True, description="Also requeue after a crash (a rank exited with an error or was killed) when the attempt "
        "got past its first step; a failure before the first step is not retried (it would fail again)."
    )


class Watchdog(Section):
    """Hang and straggler watchdog (DESIGN.md, the watchdog): heartbeats of every rank, watched by node 0."""

    enabled: bool = Field(True, description="Watch the ranks' heartbeats; off: no heartbeats, no watcher.")
    hang_timeout_s: int = Field(
        900, ge=1, le=MAX_WATCH_S, description="A rank that made no progress (no heartbeat) for this long after its "
        "first step is hung: its stacks are dumped, a report written and `on_hang` applied. Must exceed the longest "
        "step phase (a forward, an evaluation, a generation) plus `poll_interval_s`.")
    startup_timeout_s: int = Field(
        3600, ge=1, le=MAX_WATCH_S, description="Every rank must reach its first training step this long after "
        "node 0's launcher started (model loading and data tokenization included), else the start is stuck; run "
        "`hpcqwen prepare` first for a dataset that takes longer to tokenize.")
    save_timeout_s: int = Field(
        3600, ge=1, le=MAX_WATCH_S, description="The allowance of a rank in the `save` phase (replaces "
        "hang_timeout_s while it saves a checkpoint), so a slow save is not a hang.")
    on_hang: Literal["requeue", "cancel", "report"] = Field(
        "requeue", description="requeue: end the attempt and requeue it (same restart count as requeue.max_restarts; "
        "cancel when none remain); cancel: end the job; report: only write the report (the job runs on).")
    exclude_bad_node: bool = Field(True, description="On requeue, keep the suspect node out of the next attempt "
                                   "(ExcNodeList, set by a small helper job while the requeued job is held).")
    straggler_ratio: float | None = Field(
        2.0, ge=1.1, le=MAX_FACTOR, description="Report a rank whose work per step (its forward passes: the part of "
        "a step with no collective) takes this many times the median of the other ranks'; null: off.")
    poll_interval_s: float = Field(10.0, ge=0.1, le=600, description="Seconds between two looks of the watcher "
                                   "(and the longest a rank's heartbeat waits before it is written).")


class SpecView(Protocol):
    """The whole job spec as a task's cross-checks see it (read only): `hpcqwen.spec.JobSpec`."""

    @property
    def name(self) -> str: ...
    @property
    def cluster(self) -> ClusterProfile: ...
    @property
    def resources(self) -> Resources: ...
    @property
    def array(self) -> ArraySpec | None: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def requeue(self) -> Requeue: ...
    @property
    def watchdog(self) -> Watchdog: ...
    @property
    def task(self) -> Any: ...
    @property
    def gpus_per_node(self) -> int: ...
    @property
    def nproc_per_node(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def rollout_nodes(self) -> int: ...
    def task_for(self, array_index: int | None) -> Any: ...
