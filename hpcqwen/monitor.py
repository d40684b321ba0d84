"""The queue monitor's data: one squeue call per refresh, shared by every terminal, joined with run dirs.

`poll_squeue` makes at most one `squeue` call (all jobs, every array task) per refresh
interval for ALL terminals of a user: the result is kept in an on-disk cache under a file
lock, and a slow or dead controller makes every terminal back off together. `fetch_rows`
joins those job rows with run dirs (squeue's %Z is the run dir, since jobs run with
`--chdir=RUN_DIR`; recent run dirs under the run root add jobs that left the queue, which
one `sacct` call answers) and reads each run's metrics.jsonl tail, newest complete checkpoint
and launches.jsonl restarts. Nothing here raises on bad Slurm output or unreadable files: a
monitor shows what it knows, with its age.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from hpcqwen import slurm
from hpcqwen.backends import local_status
from hpcqwen.checkpoints import latest_complete, step_of
from hpcqwen.errors import HpcqwenError
from hpcqwen.metrics import tail_metrics
from hpcqwen.paths import MANIFEST, RunPaths, is_run_dir

DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 5.0
MAX_BACKOFF_S = 600.0
SLOW_SQUEUE_S = 10.0  # an answer slower than this counts as a strike, like a refusal
SQUEUE_TIMEOUT_S = 20.0
DEFAULT_RECENT_H = 24.0
CACHE_VERSION = 1
T = TypeVar("T")


# ---- rows ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """What the tail of one metrics.jsonl says (None where the runner did not log it)."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    losses: tuple[float, ...] = ()  # recent losses, oldest first (the sparkline)
    lr: float | None = None
    tokens_per_s: float | None = None
    reward_mean: float | None = None  # GRPO
    done: int | None = None  # distill: samples done / total, shards written
    total: int | None = None
    shards_done: int | None = None
    phase: str = ""
    updated_at: float | None = None  # `time` of the newest line
    steps_per_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds to `total_steps` at the recent step rate."""
        if self.step is None or not self.total_steps or not self.steps_per_s:
            return None
        return max(0.0, (self.total_steps - self.step) / self.steps_per_s)


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


@dataclass(frozen=True)
class PollStatus:
    """How fresh the squeue data is, and why it may not be."""

    fetched_at: float | None = None  # last successful squeue
    attempted_at: float | None = None
    error: str = ""  # of the last attempt; "" when it succeeded
    error_since: float | None = None  # first failure since the last success
    strikes: int = 0  # failures or slow answers in a row (the backoff exponent)
    next_at: float | None = None  # no squeue before this time, in any terminal
    duration_s: float | None = None
    calls: int = 0  # squeue calls THIS process made (the rest came from the shared cache)


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


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---- the shared squeue cache --------------------------------------------------------------

def cache_dir() -> Path:
    """HPCQWEN_CACHE_DIR, else $XDG_CACHE_HOME/hpcqwen, else ~/.cache/hpcqwen."""
    if os.environ.get("HPCQWEN_CACHE_DIR"):
        return Path(os.environ["HPCQWEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcqwen"


def backoff_s(interval_s: float, strikes: int) -> float:
    """The wait before the next squeue: the interval, doubled per strike, capped."""
    return min(max(MAX_BACKOFF_S, interval_s), max(interval_s, MIN_INTERVAL_S) * 2 ** min(strikes, 16))


def _cache_path(directory: Path) -> Path:
    # One cache per cluster: a user pointing SLURM_CONF at another cluster gets another file.
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    key = re.sub(r"[^A-Za-z0-9]+", "_", conf).strip("_")[-60:]
    return directory / f"squeue-{key}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, **data}), encoding="utf-8")
        tmp.replace(path)  # readers without the lock see the old file or the new one
    except OSError:
        pass  # a read-only home: every terminal polls on its own; still one call per refresh


def _rows_from(data: dict[str, Any]) -> list[slurm.JobRow]:
    fields = {f.name for f in dataclasses.fields(slurm.JobRow)}
    out = []
    for item in data.get("rows") or []:
        try:
            out.append(slurm.JobRow(**{k: v for k, v in item.items() if k in fields}))
        except TypeError:
            continue
    return out


def _status_from(data: dict[str, Any], calls: int) -> PollStatus:
    keys = ("fetched_at", "attempted_at", "error", "error_since", "strikes", "next_at", "duration_s")
    return PollStatus(**{k: data[k] for k in keys if k in data}, calls=calls)


def poll_squeue(interval_s: float = DEFAULT_INTERVAL_S, *, directory: Path | None = None, force: bool = False,
                run: slurm.RunCmd = slurm.run_cmd, clock: Callable[[], float] = time.time,
                ) -> tuple[list[slurm.JobRow], PollStatus]:
    """Every job in the queue (one row per array task): from the shared cache while it is fresh,
    else from ONE squeue call, which is then shared. Never raises for Slurm trouble: the error
    and the age of the last good data are in the returned status."""
    interval_s = max(MIN_INTERVAL_S, interval_s)
    path = _cache_path(directory or cache_dir())
    lock = FileLock(str(path.with_suffix(".lock")), timeout=SQUEUE_TIMEOUT_S + 5)
    try:
        with lock:
            return _poll_locked(path, interval_s, force, run, clock)
    except (Timeout, OSError):
        # Another terminal is stuck in a squeue call, or the cache dir is unusable: show
        # what the cache has rather than adding a call.
        data = _read_json(path)
        return _rows_from(data), _status_from(data, 0)


def _poll_locked(path: Path, interval_s: float, force: bool, run: slurm.RunCmd,
                 clock: Callable[[], float]) -> tuple[list[slurm.JobRow], PollStatus]:
    data, now = _read_json(path), clock()
    strikes = int(data.get("strikes", 0))
    wait = MIN_INTERVAL_S if force and not strikes else backoff_s(interval_s, strikes)
    if data.get("attempted_at") and now < data["attempted_at"] + wait:
        return _rows_from(data), _status_from(data, 0)
    start = time.monotonic()
    try:
        rows = slurm.squeue(run=lambda argv, _t: run(argv, SQUEUE_TIMEOUT_S))
    except HpcqwenError as e:
        strikes += 1
        data.update(attempted_at=now, error=e.message, strikes=strikes, duration_s=time.monotonic() - start,
                    error_since=data.get("error_since") or now, next_at=now + backoff_s(interval_s, strikes))
        _write_json(path, data)
        return _rows_from(data), _status_from(data, 1)
    took = time.monotonic() - start
    strikes = strikes + 1 if took > SLOW_SQUEUE_S else 0
    data = {"rows": [dataclasses.asdict(r) for r in rows], "fetched_at": now, "attempted_at": now, "error": "",
            "error_since": None, "strikes": strikes, "duration_s": took, "next_at": now + backoff_s(interval_s, strikes)}
    _write_json(path, data)
    return rows, _status_from(data, 1)


# ---- run dirs -------------------------------------------------------------------------------

_STAT_MEMO: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}


def _by_stat(kind: str, path: Path, read: Callable[[Path], T], default: T) -> T:
    """read(path), re-read only when the file's mtime or size changed (cheap on NFS)."""
    try:
        st = path.stat()
    except OSError:
        return default
    key, sig = (kind, str(path)), (st.st_mtime_ns, st.st_size)
    hit = _STAT_MEMO.get(key)
    if hit and hit[0] == sig:
        return hit[1]  # type: ignore[no-any-return]
    if len(_STAT_MEMO) > 50_000:
        _STAT_MEMO.clear()
    try:
        value = read(path)
    except (OSError, ValueError):
        value = default
    _STAT_MEMO[key] = (sig, value)
    return value


@lru_cache(maxsize=65536)
def _is_run_dir(work_dir: str) -> bool:
    # Memoized for good: a job's run dir exists before sbatch is called, so a work dir that is
    # not a run dir while its job is queued never becomes one.
    return is_run_dir(work_dir)


def _manifest(run_dir: Path) -> dict[str, Any]:
    data = _by_stat("manifest", run_dir / MANIFEST, lambda p: json.loads(p.read_text(encoding="utf-8")), {})
    return data if isinstance(data, dict) else {}


def recent_run_dirs(run_root: Path | None, since: float) -> list[Path]:
    """Run dirs `<run_root>/<name>/<UTC stamp>-<hash>` submitted after `since` (from the name)."""
    if run_root is None or not run_root.is_dir():
        return []
    cutoff = dt.datetime.fromtimestamp(since, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    found = []
    for name_dir in _subdirs(run_root):
        found += [d for d in _subdirs(name_dir) if d.name[:16] >= cutoff and (d / MANIFEST).is_file()]
    return found


def _subdirs(path: Path) -> list[Path]:
    def scan(p: Path) -> list[Path]:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    return _by_stat("subdirs", path, scan, [])


def read_progress(path: Path) -> Progress | None:
    """Progress from the last lines of a metrics.jsonl (None when there is none)."""
    return _by_stat("metrics", path, _progress_of, None)


def _progress_of(path: Path) -> Progress | None:
    recs = tail_metrics(path, n=64)
    if not recs:
        return None

    def latest(key: str) -> float | None:
        return next((v for r in reversed(recs) if (v := _number(r.get(key))) is not None), None)
    # Step rate over the records since the last restart (a requeue resets the clock).
    timed = [(_number(r.get("step")), _number(r.get("time"))) for r in recs]
    pts = [(s, t) for s, t in timed if s is not None and t is not None]
    for i in range(len(pts) - 1, 0, -1):
        if pts[i][0] < pts[i - 1][0] or pts[i][1] - pts[i - 1][1] > 600:
            pts = pts[i:]
            break
    (s0, t0), (s1, t1) = (pts[max(0, len(pts) - 20)], pts[-1]) if pts else ((0.0, 0.0), (0.0, 0.0))
    step, total = latest("step"), latest("total_steps")
    done, dtotal, shards = latest("done"), latest("total"), latest("shards_done")
    return Progress(
        step=int(step) if step is not None else None, total_steps=int(total) if total else None,
        loss=latest("loss"), losses=tuple(v for r in recs if (v := _number(r.get("loss"))) is not None)[-24:],
        lr=latest("lr"), tokens_per_s=latest("tokens_per_s"), reward_mean=latest("reward_mean"),
        done=int(done) if done is not None else None, total=int(dtotal) if dtotal is not None else None,
        shards_done=int(shards) if shards is not None else None, phase=str(recs[-1].get("phase") or ""),
        updated_at=latest("time"), steps_per_s=(s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None)


def _restarts(run_dir: Path) -> dict[int | None, int]:
    def read(p: Path) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                key, n = rec.get("array_index"), int(rec.get("restart_count") or 0)
            except (ValueError, TypeError, AttributeError):
                continue
            out[key] = max(out.get(key, 0), n)
        return out
    return _by_stat("launches", RunPaths(run_dir).launches, read, {})


def _checkpoint(task_dir: Path) -> tuple[int | None, float | None]:
    try:
        ckpt = latest_complete(task_dir / "checkpoints")
        return (step_of(ckpt), (ckpt / "hpcqwen-complete.json").stat().st_mtime) if ckpt else (None, None)
    except OSError:
        return None, None


# ---- the join -------------------------------------------------------------------------------

def fetch_rows(jobs: Iterable[slurm.JobRow], *, run_root: Path | None, fetched_at: float | None, now: float,
               user: str | None = None, recent_h: float = DEFAULT_RECENT_H, ask_sacct: bool = True,
               run: slurm.RunCmd = slurm.run_cmd) -> list[RunRow]:
    """One RunRow per run dir: the queued jobs that have an hpcqwen run dir (%Z), plus run dirs
    under `run_root` submitted in the last `recent_h` hours whose jobs left the queue (ONE sacct
    call for those, skipped with `ask_sacct=False`, e.g. while the controller is down)."""
    groups: dict[Path, list[slurm.JobRow]] = {}
    for j in jobs:
        if j.work_dir and (user is None or j.user == user) and _is_run_dir(j.work_dir):
            groups.setdefault(Path(j.work_dir), []).append(j)
    for d in recent_run_dirs(run_root, now - recent_h * 3600):
        if d not in groups and (user is None or _manifest(d).get("user") in (None, user)):
            groups[d] = []
    missing = [jid for d, rows in groups.items() for jid in _unseen_jobs(_manifest(d), rows)]
    finished = _sacct_by_job(missing, run) if missing and ask_sacct else {}
    out = []
    for d, rows in groups.items():
        info = _manifest(d)
        seen = {r.job_id for r in rows}
        extra = [r for jid in (info.get("job_ids") or []) for r in finished.get(str(jid), []) if r.job_id not in seen]
        out.append(build_row(d, info, rows + extra, fetched_at))
    return out


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


def _sacct_by_job(job_ids: list[str], run: slurm.RunCmd) -> dict[str, list[slurm.JobRow]]:
    try:
        rows = slurm.sacct(job_ids, run=run)
    except HpcqwenError:
        return {}
    out: dict[str, list[slurm.JobRow]] = {}
    for r in rows:
        out.setdefault(r.array_job_id, []).append(r)
    return out


def build_row(run_dir: Path, info: dict[str, Any], rows: list[slurm.JobRow], fetched_at: float | None) -> RunRow:
    """The RunRow of one run dir from its job rows (squeue first, then sacct), manifest and files."""
    paths, restarts = RunPaths(run_dir), _restarts(run_dir)
    job_ids = [str(j) for j in info.get("job_ids") or []] or sorted({r.array_job_id for r in rows})
    submitted = _iso_to_epoch(info.get("submitted_at"))
    base: dict[str, Any] = {"name": str(info.get("name") or (rows[0].name if rows else run_dir.parent.name)),
                            "job_id": ",".join(job_ids), "run_dir": str(run_dir), "submitted_at": submitted,
                            "user": rows[0].user if rows and rows[0].user else str(info.get("user") or "")}
    if info.get("backend") == "local" and job_ids:
        state = local_status(paths, job_ids[0])
        progress = read_progress(paths.task(None).metrics)
        ck = _checkpoint(paths.root)
        return RunRow(**base, slurm_state=state, source="local", progress=progress, checkpoint_step=ck[0],
                      checkpoint_at=ck[1])
    size = info.get("array_size")
    if size is not None or any(r.array_task_id is not None for r in rows):
        return _array_row(base, paths, rows, size, restarts, fetched_at)
    job = next((r for r in rows if r.source == "squeue"), rows[0] if rows else None)
    ck = _checkpoint(paths.root)
    if job is None:
        return RunRow(**base, slurm_state="UNKNOWN", reason="NotInQueue", source="none",
                      progress=read_progress(paths.task(None).metrics), checkpoint_step=ck[0], checkpoint_at=ck[1],
                      restarts=max(restarts.values(), default=0))
    running = job.state == slurm.JobState.RUNNING and job.source == "squeue"
    return RunRow(**base, slurm_state=job.slurm_state, reason=job.reason, dependency=job.dependency,
                  nodes=job.nodes, gpus_per_node=gpus_of(job.gres), nodelist=job.nodelist,
                  elapsed_s=parse_duration(job.elapsed), elapsed_at=fetched_at if running else None,
                  time_limit_s=parse_duration(job.time_limit), restarts=max(restarts.values(), default=0),
                  progress=read_progress(paths.task(None).metrics), checkpoint_step=ck[0], checkpoint_at=ck[1],
                  source=job.source)


def _array_row(base: dict[str, Any], paths: RunPaths, rows: list[slurm.JobRow], size: int | None,
               restarts: dict[int | None, int], fetched_at: float | None) -> RunRow:
    by_task: dict[int, slurm.JobRow] = {}
    for r in sorted(rows, key=lambda r: r.source != "squeue"):  # squeue's row wins over sacct's
        if r.array_task_id is not None:
            by_task.setdefault(r.array_task_id, r)
    tasks = []
    for i in range(max(size or 0, max(by_task, default=-1) + 1)):
        r = by_task.get(i)
        tdir = paths.task(i).dir
        ck = _checkpoint(tdir)
        tasks.append(TaskRow(i, r.job_id if r else f"{base['job_id'].split(',')[0]}_{i}",
                             r.slurm_state if r else "UNKNOWN", r.reason if r else "",
                             parse_duration(r.elapsed) if r else None, read_progress(tdir / "metrics.jsonl"),
                             ck[0], ck[1], restarts.get(i, 0)))
    first = next((r for r in rows if r.source == "squeue"), rows[0] if rows else None)
    state = array_state([t.slurm_state for t in tasks])
    reason = next((t.reason for t in tasks if t.slurm_state == state and t.reason), "")
    progs = [t.progress for t in tasks if t.progress]
    agg = Progress(step=sum(p.step or 0 for p in progs), total_steps=sum(p.total_steps or 0 for p in progs) or None,
                   tokens_per_s=sum(p.tokens_per_s or 0 for p in progs) or None,
                   steps_per_s=_array_rate(progs)) if progs else None
    elapsed = [t.elapsed_s for t in tasks if t.elapsed_s is not None]
    return RunRow(**base, slurm_state=state, reason=reason, dependency=first.dependency if first else "",
                  nodes=first.nodes if first else 0, gpus_per_node=gpus_of(first.gres) if first else 0,
                  elapsed_s=max(elapsed) if elapsed else None,
                  elapsed_at=fetched_at if state == "RUNNING" and fetched_at else None,
                  time_limit_s=parse_duration(first.time_limit) if first else None,
                  restarts=max(restarts.values(), default=0), progress=agg, tasks=tuple(tasks),
                  array_size=size, source=first.source if first else "none")


def _array_rate(progs: list[Progress]) -> float | None:
    # The array ends with its slowest task: the ETA uses the rate that makes the largest ETA.
    eta = max((p.eta_s for p in progs if p.eta_s), default=None)
    remaining = sum((p.total_steps or 0) - (p.step or 0) for p in progs)
    return remaining / eta if eta and remaining > 0 else None


ARRAY_PRIORITY = ["RUNNING", "COMPLETING", "CONFIGURING", "PENDING", "REQUEUED"]


def array_state(states: list[str]) -> str:
    """The state that describes a whole array: running beats pending; all done is COMPLETED;
    otherwise the first task state that is not COMPLETED (FAILED, TIMEOUT, an unknown one...)."""
    for s in ARRAY_PRIORITY:
        if s in states:
            return s
    return next((s for s in states if s != "COMPLETED"), "COMPLETED" if states else "UNKNOWN")


def default_run_root() -> Path:
    """HPCQWEN_RUN_ROOT, else the `local` profile's run_root, else ~/hpcqwen-runs."""
    from hpcqwen.cluster import find_profile
    from hpcqwen.specfile import expand_path

    raw = "${HPCQWEN_RUN_ROOT:-~/hpcqwen-runs}"
    profile = find_profile("local")
    if profile is not None:
        m = re.search(r"^run_root:\s*(\S+)", profile.read_text(encoding="utf-8"), re.M)
        raw = m.group(1) if m else raw
    try:
        return Path(expand_path(raw, None))
    except ValueError:
        return Path("~/hpcqwen-runs").expanduser()


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
