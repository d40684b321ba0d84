"""Slurm queries shared by every terminal of a user: on-disk caches, a lock, a backoff.

`poll_squeue(query)` answers a `Query` — the jobs of one user (`squeue --user`), and/or given job
ids (`--jobs`), never the whole queue unless asked — with one squeue call per part. While the
cached answer is younger than the refresh interval, every terminal reads it; the first terminal
to find it due takes the file lock and makes the call, the others wait on the lock and then read
the new answer. A refusal or a timeout adds a strike, and the interval doubles per strike for
everyone, up to MAX_BACKOFF_S; a slow answer (> SLOW_SQUEUE_S) spaces the next call by SLOW_SHARE
times its duration (squeue then costs the controller at most 1/SLOW_SHARE of the time), and a
forced refresh (`r`) skips both, never more often than MIN_INTERVAL_S.

`poll_sacct` does the same for the accounting rows of jobs that left the queue: a job whose rows
are all final is kept for good (checked against the run dir it ran in, since a reset cluster
reuses job ids), the others for one interval, so `--once` in several terminals makes one DBD query.

Nothing here raises for Slurm trouble: the error and the age of the last good data are in the
returned PollStatus, and the rows are the last good ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hpcqwen import slurm
from hpcqwen.errors import HpcqwenError

DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 5.0
MAX_BACKOFF_S = 600.0
SLOW_SQUEUE_S = 10.0  # an answer slower than this spaces the next call by SLOW_SHARE x its duration
SLOW_SHARE = 10.0
SQUEUE_TIMEOUT_S = 20.0
LOCK_WAIT_S = SQUEUE_TIMEOUT_S + 5  # longer than one squeue call: then the cache holds its answer
STALE_CACHE_S = 86400.0  # squeue caches of queries nobody asked for a day are removed
MAX_SACCT_ENTRIES = 20_000  # jobs kept in the shared sacct cache (the oldest answers go first)
CACHE_VERSION = 2


@dataclass(frozen=True)
class Query:
    """What one refresh asks squeue: the jobs of `user`, plus the jobs `job_ids` (both empty: all)."""

    user: str | None = None
    job_ids: tuple[str, ...] = ()

    def key(self) -> str:
        """A file-name-safe key: one cache per query."""
        user = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.user or "")[:40]
        ids = hashlib.sha256(",".join(sorted(self.job_ids)).encode()).hexdigest()[:12] if self.job_ids else ""
        return f"u{user}-j{ids}" if self.user or self.job_ids else "all"


@dataclass(frozen=True)
class PollStatus:
    """How fresh the squeue data is, and why it may not be."""

    fetched_at: float | None = None  # last successful squeue
    attempted_at: float | None = None
    error: str = ""  # of the last attempt; "" when it succeeded
    error_since: float | None = None  # first failure since the last success
    strikes: int = 0  # failures in a row (the backoff exponent)
    next_at: float | None = None  # no squeue before this time, in any terminal
    duration_s: float | None = None
    calls: int = 0  # squeue calls THIS process made (the rest came from the shared cache)
    skipped: int = 0  # lines of the last answer that did not parse (left out)
    skipped_line: str = ""  # the first of them, verbatim (clipped)

    @property
    def slow(self) -> bool:
        """The last answer took longer than SLOW_SQUEUE_S."""
        return (self.duration_s or 0.0) > SLOW_SQUEUE_S and not self.error


def cache_dir() -> Path:
    """HPCQWEN_CACHE_DIR, else $XDG_CACHE_HOME/hpcqwen, else ~/.cache/hpcqwen."""
    if os.environ.get("HPCQWEN_CACHE_DIR"):
        return Path(os.environ["HPCQWEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcqwen"


def backoff_s(interval_s: float, strikes: int) -> float:
    """The wait before the next squeue: the interval, doubled per strike, capped."""
    return float(min(max(MAX_BACKOFF_S, interval_s), max(interval_s, MIN_INTERVAL_S) * 2.0 ** min(strikes, 16)))


def _wait_s(interval_s: float, data: dict[str, Any], force: bool) -> float:
    """Seconds from the last attempt to the next: the floor when forced, else the backoff, else
    SLOW_SHARE x a slow answer's duration, else the interval."""
    if force:
        return MIN_INTERVAL_S
    took = float(data.get("duration_s") or 0.0)
    slow = min(MAX_BACKOFF_S, SLOW_SHARE * took) if took > SLOW_SQUEUE_S and not data.get("error") else 0.0
    return max(backoff_s(interval_s, int(data.get("strikes", 0))), slow)


def _cache_path(directory: Path, kind: str) -> Path:
    # One cache per cluster: a user pointing SLURM_CONF at another cluster gets another file.
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    key = re.sub(r"[^A-Za-z0-9]+", "_", conf).strip("_")[-60:]
    return directory / f"{kind}-{key}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, **data}), encoding="utf-8")
        tmp.replace(path)  # readers without the lock see the old file or the new one
    except OSError:
        pass  # a full disk: the next poll finds the cache due and asks again


def _rows_from(items: Any) -> list[slurm.JobRow]:
    fields = {f.name for f in dataclasses.fields(slurm.JobRow)}
    out = []
    for item in items or []:
        try:
            out.append(slurm.JobRow(**{k: v for k, v in item.items() if k in fields}))
        except (TypeError, AttributeError):
            continue
    return out


def _status_from(data: dict[str, Any], calls: int) -> PollStatus:
    keys = ("fetched_at", "attempted_at", "error", "error_since", "strikes", "next_at", "duration_s", "skipped",
            "skipped_line")
    return PollStatus(**{k: data[k] for k in keys if k in data}, calls=calls)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with FileLock(str(path.with_suffix(".lock")), timeout=LOCK_WAIT_S):
        yield


def poll_squeue(interval_s: float = DEFAULT_INTERVAL_S, *, query: Query = Query(), directory: Path | None = None,
                force: bool = False, run: slurm.RunCmd = slurm.run_cmd, clock: Callable[[], float] = time.time,
                ) -> tuple[list[slurm.JobRow], PollStatus]:
    """The jobs `query` asks for (one row per array task): from the shared cache while it is fresh,
    else from squeue (one call per part of the query), which is then shared. Never raises for
    Slurm trouble: the error and the age of the last good data are in the returned status."""
    interval_s = max(MIN_INTERVAL_S, interval_s)
    path = _cache_path(_usable(directory or cache_dir()), f"squeue-{query.key()}")
    try:
        with _locked(path):
            return _poll_locked(path, query, interval_s, force, run, clock)
    except Timeout:
        # Another terminal is stuck in a squeue call: show what the cache has rather than
        # adding a call to a controller that is already slow.
        data = _read_json(path)
        return _rows_from(data.get("rows")), _status_from(data, 0)


def _usable(directory: Path) -> Path:
    """`directory`, or a private folder in the temp dir when it cannot be written (a read-only
    home): the cache then is per machine, and there is still one squeue per interval."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"hpcqwen-cache-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


def ask_squeue(query: Query, run: slurm.RunCmd) -> tuple[slurm.JobRows, int]:
    """The rows `query` asks for, and the number of squeue calls made (one per part)."""
    def timed(argv: Any, _t: float) -> Any:
        return run(argv, SQUEUE_TIMEOUT_S)
    if not query.user and not query.job_ids:
        return slurm.squeue(run=timed), 1
    parts = ([slurm.squeue(user=query.user, run=timed)] if query.user else []) + \
        ([slurm.squeue(list(query.job_ids), run=timed)] if query.job_ids else [])
    rows: dict[str, slurm.JobRow] = {}
    for part in parts:
        rows.update((r.job_id, r) for r in part if r.job_id not in rows)
    return slurm.JobRows(rows.values(), [line for part in parts for line in part.skipped]), len(parts)


def _poll_locked(path: Path, query: Query, interval_s: float, force: bool, run: slurm.RunCmd,
                 clock: Callable[[], float]) -> tuple[list[slurm.JobRow], PollStatus]:
    data, now = _read_json(path), clock()
    if data.get("attempted_at") is not None and now < data["attempted_at"] + _wait_s(interval_s, data, force):
        return _rows_from(data.get("rows")), _status_from(data, 0)
    start = time.monotonic()
    try:
        rows, calls = ask_squeue(query, run)
    except HpcqwenError as e:
        strikes = int(data.get("strikes", 0)) + 1
        data.update(attempted_at=now, error=e.message, strikes=strikes, duration_s=time.monotonic() - start,
                    error_since=data.get("error_since") or now, next_at=now + backoff_s(interval_s, strikes))
        _write_json(path, data)
        return _rows_from(data.get("rows")), _status_from(data, 1)
    data = {"rows": [dataclasses.asdict(r) for r in rows], "fetched_at": now, "attempted_at": now, "error": "",
            "error_since": None, "strikes": 0, "duration_s": time.monotonic() - start, "skipped": len(rows.skipped),
            "skipped_line": rows.skipped[0][:200] if rows.skipped else ""}
    data["next_at"] = now + _wait_s(interval_s, data, False)
    if not path.exists():
        _prune(path.parent)
    _write_json(path, data)
    return list(rows), _status_from(data, calls)


def _prune(directory: Path) -> None:
    """Remove squeue caches untouched for a day: each set of job ids (--jobs) has its own file."""
    cutoff = time.time() - STALE_CACHE_S
    for old in directory.glob("squeue-*"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            continue


# ---- sacct ----------------------------------------------------------------------------------------

SacctWanted = Mapping[str, tuple[str, int]]  # job id -> (the run dir it ran in, tasks expected: 1 or the array size)


def poll_sacct(wanted: SacctWanted, interval_s: float = DEFAULT_INTERVAL_S, *, directory: Path | None = None,
               run: slurm.RunCmd = slurm.run_cmd, clock: Callable[[], float] = time.time,
               ) -> dict[str, list[slurm.JobRow]]:
    """Accounting rows by (array) job id for jobs that left the queue: from the shared cache when
    final or fresh, else from ONE sacct call for the rest. {} for jobs sacct could not answer."""
    interval_s = max(MIN_INTERVAL_S, interval_s)
    path = _cache_path(_usable(directory or cache_dir()), "sacct")
    try:
        with _locked(path):
            return _sacct_locked(path, wanted, interval_s, run, clock())
    except Timeout:
        jobs = _read_json(path).get("jobs") or {}
        return {j: rows for j in wanted if (rows := _cached(jobs.get(j), wanted[j], clock(), interval_s))}


def _sacct_locked(path: Path, wanted: SacctWanted, interval_s: float, run: slurm.RunCmd,
                  now: float) -> dict[str, list[slurm.JobRow]]:
    data = _read_json(path)
    jobs: dict[str, Any] = data.get("jobs") if isinstance(data.get("jobs"), dict) else {}  # type: ignore[assignment]
    out = {j: rows for j in wanted if (rows := _cached(jobs.get(j), wanted[j], now, interval_s)) is not None}
    ask = [j for j in wanted if j not in out]
    if not ask:
        return out
    try:
        found = slurm.sacct(ask, run=run)
    except HpcqwenError:
        return out
    for j in ask:
        out[j] = [r for r in found if r.array_job_id == j]
        jobs[j] = {"at": now, "rows": [dataclasses.asdict(r) for r in out[j]]}
    if len(jobs) > MAX_SACCT_ENTRIES:
        jobs = dict(sorted(jobs.items(), key=lambda kv: -float(kv[1].get("at", 0)))[:MAX_SACCT_ENTRIES])
    _write_json(path, {"jobs": jobs})
    return out


def _cached(entry: Any, want: tuple[str, int], now: float, interval_s: float) -> list[slurm.JobRow] | None:
    """The cached rows when they still hold: final (every expected task ended) and of the same run
    dir, for good; anything else for one interval. None: ask sacct."""
    if not isinstance(entry, dict):
        return None
    rows, (run_dir, tasks) = _rows_from(entry.get("rows")), want
    if run_dir and any(r.work_dir and not _same_dir(r.work_dir, run_dir) for r in rows):
        return None  # a job with this id ran elsewhere: the cluster's job ids restarted
    final = len(rows) >= tasks > 0 and all(r.state.is_terminal for r in rows)
    return rows if final or now < float(entry.get("at", 0)) + interval_s else None


def _same_dir(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)
