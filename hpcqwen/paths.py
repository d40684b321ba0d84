"""Every file name on the shared filesystem, in one place.

A run dir is `<run_root>/<spec name>/<UTC timestamp>-<short hash>`. An array task keeps its
own state (STOP file, checkpoints, metrics) in `tasks/<index>/`; a plain job keeps it in the
run dir itself, so the paths of a task are the same shape either way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

SPEC_YAML = "spec.yaml"
SPEC_JSON = "spec.json"
SBATCH = "job.sbatch"
RESUBMIT_SBATCH = "job-resubmit-{n}.sbatch"  # `hpcqwen merge --resubmit`: the n-th resubmission
SAVES = "saves.jsonl"  # in a checkpoints folder: one line per completed save (step, time, save_s)
COST = "cost.json"
MANIFEST = "manifest.json"
GIT_DIFF = "git.diff"
LAUNCHES = "launches.jsonl"
LOGS = "logs"
STOP = "STOP"
OUTCOME = "OUTCOME"
FINAL = "FINAL"
PROGRESS = "PROGRESS"
LEASE = ".launch.lease"
METRICS = "metrics.jsonl"
PLOT = "metrics.png"
CHECKPOINTS = "checkpoints"
LOCAL_RC = "local.rc"
HEARTBEATS = "heartbeats"
HANGS = "hangs"
WATCHDOG = "WATCHDOG.json"
INPUTS = "inputs"


@dataclass(frozen=True)
class TaskPaths:
    """The files of one task (the whole job, or one array task)."""

    dir: Path

    @property
    def stop(self) -> Path:
        """Preemption stop file, touched by the batch script on the signal."""
        return self.dir / STOP

    @property
    def metrics(self) -> Path:
        """One JSON line per logging step, written by rank 0."""
        return self.dir / METRICS

    @property
    def checkpoints(self) -> Path:
        """checkpoint-<step>/ folders."""
        return self.dir / CHECKPOINTS

    @property
    def launches(self) -> Path:
        """One JSON line per start of this task (job id, restart count, nodes), written by node 0."""
        return self.dir / LAUNCHES

    @property
    def outcome(self) -> Path:
        """`done|stopped|failed ...`: how the ranks of the last attempt ended (node 0's launcher)."""
        return self.dir / OUTCOME

    @property
    def final(self) -> Path:
        """`STOPPED <why>`: written by the batch script when it ends a resumable run without requeue."""
        return self.dir / FINAL

    @property
    def progress(self) -> Path:
        """Touched by rank 0 after the attempt's first step (a crash after it may be requeued)."""
        return self.dir / PROGRESS

    @property
    def heartbeats(self) -> Path:
        """`<host>-<rank>.json` per rank of the current attempt (hpcqwen.heartbeat), and its faulthandler file."""
        return self.dir / HEARTBEATS

    @property
    def hangs(self) -> Path:
        """`<UTC time>/` per hang the watchdog found: `<host>-<rank>.txt` stacks and `report.md`."""
        return self.dir / HANGS

    @property
    def watchdog(self) -> Path:
        """The watcher's latest view (ages, phases, stragglers, the hang it acted on), for the monitor."""
        return self.dir / WATCHDOG

    @property
    def lease(self) -> Path:
        """The launch lease: one live launch of this task at a time (hpcqwen.lease)."""
        return self.dir / LEASE


@dataclass(frozen=True)
class RunPaths:
    """The files of one submission."""

    root: Path
    script: str = SBATCH  # the batch script this submission runs (RESUBMIT_SBATCH for a resubmission)

    def resubmission(self, n: int) -> RunPaths:
        """The same run dir, with the n-th resubmission's batch script as `sbatch`."""
        return RunPaths(self.root, RESUBMIT_SBATCH.format(n=n))

    def chunk(self, k: int) -> RunPaths:
        """The same run dir with chunk k's batch script: job-chunk-<k>.sbatch (k >= 1; chunk 0 is the script itself)."""
        script = self.script if k == 0 else self.script.replace(".sbatch", f"-chunk-{k}.sbatch")
        return RunPaths(self.root, script)

    @property
    def cost(self) -> Path:
        """GPU-hours by where they went (hpcqwen.cost), written at the end of each job and by `hpcqwen cost`."""
        return self.root / COST

    @property
    def spec_yaml(self) -> Path:
        """The spec as the user wrote it."""
        return self.root / SPEC_YAML

    @property
    def spec_json(self) -> Path:
        """The resolved, frozen spec the nodes read."""
        return self.root / SPEC_JSON

    @property
    def sbatch(self) -> Path:
        """The rendered batch script."""
        return self.root / self.script

    @property
    def manifest(self) -> Path:
        """Versions, git state, backend and job id."""
        return self.root / MANIFEST

    @property
    def git_diff(self) -> Path:
        """Uncommitted changes of the submitting project, when there are any."""
        return self.root / GIT_DIFF

    @property
    def inputs(self) -> Path:
        """Copies of the files the spec names that the nodes read (reward plugins, DeepSpeed configs)."""
        return self.root / INPUTS

    @property
    def launches(self) -> Path:
        """launches.jsonl of a plain job (array tasks keep theirs in tasks/<index>/)."""
        return self.root / LAUNCHES

    @property
    def logs(self) -> Path:
        """Slurm output files (append mode, so a requeue continues the same file)."""
        return self.root / LOGS

    @property
    def plot(self) -> Path:
        """Curves drawn from metrics.jsonl by `hpcqwen plot` (every task of an array in one file)."""
        return self.root / PLOT

    @property
    def local_rc(self) -> Path:
        """Exit code of a local-backend run."""
        return self.root / LOGS / LOCAL_RC

    @property
    def local_cancelled(self) -> Path:
        """Written by `hpcqwen cancel` before it signals a local run (its state is then CANCELLED)."""
        return self.root / LOGS / "local.cancelled"

    def task_dirs(self, array_size: int | None) -> list[TaskPaths]:
        """Every task of the run: the run dir itself, or tasks/0..N-1."""
        return [self.task(None)] if not array_size else [self.task(i) for i in range(array_size)]

    def task(self, array_index: int | None) -> TaskPaths:
        """Paths of the whole job (None) or of one array task."""
        return TaskPaths(self.root if array_index is None else self.root / "tasks" / str(array_index))

    def log_pattern(self, is_array: bool) -> str:
        """sbatch --output pattern: one file per job, or per array task."""
        return str(self.logs / ("%x-%A_%a.out" if is_array else "%x-%j.out"))


def new_run_dir(run_root: str | Path, name: str, spec_sha256: str, now: dt.datetime | None = None) -> Path:
    """A fresh run dir path (not created): `<run_root>/<name>/<UTC stamp>-<hash>`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    salt = hashlib.sha256(f"{spec_sha256}{now.isoformat()}".encode()).hexdigest()[:6]
    return Path(run_root) / name / f"{stamp}-{salt}"


def is_run_dir(path: str | Path) -> bool:
    """A folder that holds a frozen spec."""
    return (Path(path) / SPEC_JSON).is_file()
