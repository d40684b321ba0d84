"""The queue monitor's data: one squeue answer per refresh, joined with run dirs into one row per run.

`Watch.refresh()` = `hpcqwen.polling.poll_squeue` (squeue asked only for the user's jobs and the
run root's: at most one answer per interval for every terminal of the user, with a shared cache
and backoff) + `fetch_rows`, which keeps the jobs whose squeue %Z is an hpcqwen run dir (jobs run
with `--chdir=RUN_DIR`), adds recent run dirs under the run root whose jobs left the queue (one
shared, cached `sacct` call answers for all of them), collapses each array into one row with its
tasks, and reads each run's progress from its files (`hpcqwen.progress`: metrics.jsonl tail,
newest complete checkpoint, launches.jsonl restarts); metrics newer than squeue's answer turn a
stale PENDING into RUNNING (`fresh_state`). Nothing here raises on odd Slurm output or unreadable
files: a monitor shows what it knows.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen import arrays, slurm
from hpcqwen.errors import HpcqwenError
from hpcqwen.paths import RunPaths
from hpcqwen.pipeline.rows import group_pipelines, recent_stage_dirs
from hpcqwen.polling import DEFAULT_INTERVAL_S, MIN_INTERVAL_S, PollStatus, Query, SacctWanted, poll_sacct, poll_squeue
from hpcqwen.progress import (
    Progress,
    checkpoint_of,
    ending_of,
    is_run_dir_cached,
    manifest_of,
    read_progress,
    recent_run_dirs,
    refine_state,
    restarts_of,
)
from hpcqwen.queue_rows import RunRow, TaskRow, array_state
from hpcqwen.rundir import local_status
from hpcqwen.watchview import watch_alert

__all__ = ["DEFAULT_RECENT_H", "PollStatus", "Progress", "RunRow", "Snapshot", "TaskRow", "Watch", "array_state",
           "build_row", "fetch_rows", "gpus_of", "parse_duration",
           "sacct_by_job", "to_json"]
DEFAULT_RECENT_H = 24.0


# ---- parsing helpers ------------------------------------------------------------------------

def parse_duration(text: str) -> float | None:
    """Slurm's [D-]HH:MM:SS, MM:SS, or minutes -> seconds; None for UNLIMITED, N/A and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if m:
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        return float(((d * 24 + h) * 60 + mi) * 60 + s)
    return float(text) * 60 if text.strip().isdigit() else None


def gpus_of(gres: str) -> int:
    """GPUs per node from squeue's %b (gres:gpu:2, gres/gpu:h100:8); 0 when none."""
    m = re.search(r"gpu(?::[A-Za-z0-9_.-]+)?[:=](\d+)", gres)
    return int(m.group(1)) if m else 0


def _iso_to_epoch(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


# ---- the join -------------------------------------------------------------------------------

SacctLookup = Callable[[SacctWanted], dict[str, list[slurm.JobRow]]]


def fetch_rows(jobs: Iterable[slurm.JobRow], *, run_root: Path | None, fetched_at: float | None, now: float,
               user: str | None = None, recent_h: float = DEFAULT_RECENT_H, ask_sacct: bool = True,
               lookup: SacctLookup | None = None, run: slurm.RunCmd = slurm.run_cmd) -> list[RunRow]:
    """One RunRow per run dir: the queued jobs that have an hpcqwen run dir (%Z), plus run dirs
    under `run_root` submitted in the last `recent_h` hours whose jobs left the queue (ONE sacct
    call for those through `lookup`; skipped with `ask_sacct=False`, e.g. while the controller
    is down)."""
    groups: dict[Path, list[slurm.JobRow]] = {}
    for j in jobs:
        if j.work_dir and (user is None or j.user == user) and is_run_dir_cached(j.work_dir):
            groups.setdefault(Path(j.work_dir), []).append(j)
    for d in [*recent_run_dirs(run_root, now - recent_h * 3600), *recent_stage_dirs(run_root, now - recent_h * 3600)]:
        if d not in groups and (user is None or manifest_of(d).get("user") in (None, user)):
            groups[d] = []
    missing = {jid: (str(d), int(manifest_of(d).get("array_size") or 1))
               for d, rows in groups.items() for jid in _unseen_jobs(manifest_of(d), rows)}
    finished = (lookup or (lambda w: sacct_by_job(list(w), run)))(missing) if missing and ask_sacct else {}
    out = []
    for d, rows in groups.items():
        info = manifest_of(d)
        seen = {r.job_id for r in rows}
        extra = [r for jid in (info.get("job_ids") or []) for r in finished.get(str(jid), []) if r.job_id not in seen]
        out.append(build_row(d, info, rows + extra, fetched_at, unseen="NotInQueue" if ask_sacct else "NoData"))
    return group_pipelines(out)  # a pipeline is one row of stages; GPU·H for every row


def _unseen_jobs(info: dict[str, Any], rows: list[slurm.JobRow]) -> list[str]:
    if info.get("backend") == "local":
        return []
    size = info.get("array_size")
    out = []
    for jid in (str(j) for j in info.get("job_ids") or []):
        mine = [r for r in rows if r.array_job_id == jid]
        if not mine or (size and len(mine) < size):
            out.append(jid)
    return out


def sacct_by_job(job_ids: list[str], run: slurm.RunCmd = slurm.run_cmd) -> dict[str, list[slurm.JobRow]]:
    """ONE sacct call for jobs that left the queue: rows by (array) job id; {} when it fails."""
    try:
        rows = slurm.sacct(job_ids, run=run)
    except HpcqwenError:
        return {}
    out: dict[str, list[slurm.JobRow]] = {}
    for r in rows:
        out.setdefault(r.array_job_id, []).append(r)
    return out


def build_row(run_dir: Path, info: dict[str, Any], rows: list[slurm.JobRow], fetched_at: float | None,
              unseen: str = "NotInQueue") -> RunRow:
    """The RunRow of one run dir from its job rows (squeue first, then sacct), manifest and files;
    `unseen` is the reason given when no row knows the job."""
    paths, restarts = RunPaths(run_dir), restarts_of(run_dir, info.get("array_size"))
    rows = arrays.with_offsets(rows, arrays.offsets_of(info))  # chunks of an array above MaxArraySize
    job_ids = [str(j) for j in info.get("job_ids") or []] or sorted({r.array_job_id for r in rows})
    submitted = _iso_to_epoch(info.get("submitted_at"))
    base: dict[str, Any] = {"name": str(info.get("name") or (rows[0].name if rows else run_dir.parent.name)),
                            "job_id": ",".join(job_ids), "run_dir": str(run_dir), "submitted_at": submitted,
                            "user": rows[0].user if rows and rows[0].user else str(info.get("user") or "")}
    if info.get("backend") == "local" and job_ids:
        state = local_status(paths, job_ids[0])
        progress = read_progress(paths.task(None).metrics)
        ck = checkpoint_of(paths.root)
        return RunRow(**base, slurm_state=state, source="local", progress=progress, checkpoint_step=ck[0],
                      checkpoint_at=ck[1])
    size = info.get("array_size")
    if size is not None or any(r.array_task_id is not None for r in rows):
        return _array_row(base, paths, rows, size, restarts, fetched_at, unseen)
    job = next((r for r in rows if r.source == "squeue"), rows[0] if rows else None)
    ck = checkpoint_of(paths.root)
    if job is None:
        return RunRow(**base, slurm_state="UNKNOWN", reason=unseen_reason(unseen, paths.root), source="none",
                      progress=read_progress(paths.task(None).metrics), checkpoint_step=ck[0], checkpoint_at=ck[1],
                      restarts=max(restarts.values(), default=0))
    progress = read_progress(paths.task(None).metrics)
    state, reason, elapsed = fresh_state(job, progress, fetched_at, refine_state(job.slurm_state, paths.root))
    running = slurm.SLURM_STATES.get(state) == slurm.JobState.RUNNING and job.source == "squeue"
    return RunRow(**base, slurm_state=state, reason=reason,
                  dependency=job.dependency, nodes=job.nodes, gpus_per_node=gpus_of(job.gres), nodelist=job.nodelist,
                  elapsed_s=elapsed, elapsed_at=fetched_at if running and elapsed is not None else None,
                  time_limit_s=parse_duration(job.time_limit), restarts=max(restarts.values(), default=0),
                  progress=progress, checkpoint_step=ck[0], checkpoint_at=ck[1], source=job.source,
                  alert=watch_alert(paths.root) if running else "")


def fresh_state(job: slurm.JobRow, progress: Progress | None, fetched_at: float | None,
                state: str) -> tuple[str, str, float | None]:
    """(state, reason, elapsed s) of a job row, where metrics logged after squeue's answer overrule it:
    squeue is asked every 30 s and the files are read every 5 s, so a job squeue last saw PENDING that
    has logged a step since is RUNNING (since when is unknown: no elapsed). Metrics older than the
    answer (a requeued job's) change nothing."""
    pending = slurm.SLURM_STATES.get(state) == slurm.JobState.PENDING and job.source == "squeue"
    if pending and progress and progress.updated_at and fetched_at and progress.updated_at > fetched_at:
        return "RUNNING", "", None
    return state, job.reason, parse_duration(job.elapsed)


def _array_row(base: dict[str, Any], paths: RunPaths, rows: list[slurm.JobRow], size: int | None,
               restarts: dict[int | None, int], fetched_at: float | None, unseen: str) -> RunRow:
    by_task: dict[int, slurm.JobRow] = {}
    # the newest job's row wins (a resubmission reruns some tasks), and squeue's over sacct's
    newest_first = sorted(rows, key=lambda r: (-int(r.array_job_id) if r.array_job_id.isdigit() else 0,
                                               r.source != "squeue"))
    for row in newest_first:
        if row.array_task_id is not None:
            by_task.setdefault(row.array_task_id, row)
    tasks = [_task_row(i, by_task.get(i), paths, base["job_id"].split(",")[0], restarts, fetched_at, unseen)
             for i in range(max(size or 0, max(by_task, default=-1) + 1))]
    first = next((r for r in rows if r.source == "squeue"), rows[0] if rows else None)
    state = array_state([t.slurm_state for t in tasks])
    reason = next((t.reason for t in tasks if t.slurm_state == state and t.reason), "")
    progs = [t.progress for t in tasks if t.progress]
    rewards = [p.reward_mean for p in progs if p.reward_mean is not None]
    waiting = any(slurm.SLURM_STATES.get(t.slurm_state) == slurm.JobState.PENDING for t in tasks)
    agg = Progress(step=sum(p.step or 0 for p in progs), total_steps=sum(p.total_steps or 0 for p in progs) or None,
                   tokens_per_s=sum(p.tokens_per_s or 0 for p in progs if p.phase != "done") or None,
                   reward_mean=sum(rewards) / len(rewards) if rewards else None,
                   steps_per_s=None if waiting else _array_rate(progs)) if progs else None
    elapsed = [t.elapsed_s for t in tasks if t.elapsed_s is not None]
    return RunRow(**base, slurm_state=state, reason=reason, dependency=first.dependency if first else "",
                  nodes=first.nodes if first else 0, gpus_per_node=gpus_of(first.gres) if first else 0,
                  elapsed_s=max(elapsed) if elapsed else None,
                  elapsed_at=fetched_at if state == "RUNNING" and fetched_at else None,
                  time_limit_s=parse_duration(first.time_limit) if first else None,
                  restarts=max(restarts.values(), default=0), progress=agg, tasks=tuple(tasks),
                  array_size=size, source=first.source if first else "none")


def _task_row(i: int, r: slurm.JobRow | None, paths: RunPaths, job_id: str, restarts: dict[int | None, int],
              fetched_at: float | None, unseen: str) -> TaskRow:
    tdir = paths.task(i).dir
    ck, progress = checkpoint_of(tdir), read_progress(paths.task(i).metrics)
    if r is None:
        return TaskRow(i, f"{job_id}_{i}", "UNKNOWN", unseen_reason(unseen, tdir), None, progress, ck[0], ck[1],
                       restarts.get(i, 0))
    state, reason, took = fresh_state(r, progress, fetched_at, refine_state(r.slurm_state, tdir))
    alert = watch_alert(tdir) if r.state == slurm.JobState.RUNNING else ""
    return TaskRow(i, r.job_id, state, reason, took, progress, ck[0], ck[1], restarts.get(i, 0), alert=alert)


def unseen_reason(unseen: str, task_dir: Path) -> str:
    """The reason shown for a job no Slurm row knows: `unseen` (NotInQueue, NoData), or, when squeue
    and sacct both answered without it (past MinJobAge, no accounting), what the task's files say."""
    said = ending_of(task_dir) if unseen == "NotInQueue" else ""
    return f"not in squeue or sacct; the run dir says: {said}" if said else unseen


def _array_rate(progs: list[Progress]) -> float | None:
    # The array ends with its slowest task: the ETA uses the rate that makes the largest ETA
    # (no ETA at all while tasks still wait: their start is the scheduler's secret).
    eta = max((p.eta_s for p in progs if p.eta_s), default=None)
    remaining = sum((p.total_steps or 0) - (p.step or 0) for p in progs)
    return remaining / eta if eta and remaining > 0 else None


@dataclass(frozen=True)
class Snapshot:
    """What one refresh saw."""

    rows: list[RunRow]
    status: PollStatus
    taken_at: float


class Watch:
    """A refresh = `poll_squeue` (shared, at most one squeue per interval) + `fetch_rows`.

    squeue is asked only for what is shown: with `user` (--me) that user's jobs; otherwise the jobs of
    `me` plus the other users' jobs of the run dirs under the run root (`--jobs`), never the whole
    queue. sacct answers go through the shared `poll_sacct` cache (finished jobs for good), so
    refreshing the files (metrics, checkpoints) more often than squeue adds no Slurm load.
    """

    def __init__(self, run_root: Path | None, interval_s: float = DEFAULT_INTERVAL_S, *, user: str | None = None,
                 me: str | None = None, recent_h: float = DEFAULT_RECENT_H, directory: Path | None = None,
                 run: slurm.RunCmd = slurm.run_cmd, clock: Callable[[], float] = time.time) -> None:
        self.run_root, self.user, self.recent_h, self.directory, self.run = run_root, user, recent_h, directory, run
        self.me, self.clock = me or user or getpass.getuser(), clock
        self.interval_s = max(MIN_INTERVAL_S, interval_s)
        self.squeue_calls = 0

    def query(self, now: float) -> Query:
        """What squeue is asked: the user's jobs, and (without --me) the run root's other jobs."""
        if self.user:
            return Query(user=self.user)
        others = {str(j) for d in recent_run_dirs(self.run_root, now - self.recent_h * 3600)
                  if (info := manifest_of(d)).get("backend") != "local" and info.get("user") != self.me
                  for j in info.get("job_ids") or [] if str(j).isdigit()}
        return Query(user=self.me, job_ids=tuple(sorted(others)))

    def refresh(self, force: bool = False) -> Snapshot:
        """Poll (or read the shared cache), then join with the run dirs."""
        now = self.clock()
        jobs, status = poll_squeue(self.interval_s, query=self.query(now), directory=self.directory, force=force,
                                   run=self.run, clock=self.clock)
        self.squeue_calls += status.calls
        rows = fetch_rows(jobs, run_root=self.run_root, fetched_at=status.fetched_at, now=now, user=self.user,
                          recent_h=self.recent_h, ask_sacct=not status.error, run=self.run,
                          lookup=lambda wanted: poll_sacct(wanted, self.interval_s, directory=self.directory,
                                                           run=self.run, clock=self.clock))
        return Snapshot(rows, status, now)


def to_json(rows: list[RunRow], status: PollStatus, now: float) -> dict[str, Any]:
    """The data of one frame, for `hpcqwen queue --json`."""
    def row(r: RunRow) -> dict[str, Any]:
        d = dataclasses.asdict(r)
        elapsed = r.elapsed_now(now)
        d["state"], d["elapsed_s"] = r.state.value, elapsed
        d["eta_s"] = r.progress.eta_s if r.progress else None
        d["remaining_s"] = r.time_limit_s - elapsed if r.time_limit_s and elapsed is not None else None
        return d
    age = now - status.fetched_at if status.fetched_at else None
    return {"now": now, "squeue": {**dataclasses.asdict(status), "age_s": age}, "runs": [row(r) for r in rows]}
