"""One squeue call per refresh for every terminal of a user: a shared on-disk cache, a lock, a backoff.

`poll_squeue` returns every job in the queue (one row per array task). While the cached answer
is younger than the refresh interval, every terminal reads it; the first terminal to find it
due takes the file lock and makes the ONE squeue call, the others wait on the lock and then
read the new answer. A refusal, a timeout or a slow answer (> SLOW_SQUEUE_S) adds a strike, and
the interval doubles per strike for everyone, up to MAX_BACKOFF_S; a fast answer clears them.
Nothing here raises for Slurm trouble: the error and the age of the last good data are in the
returned PollStatus, and the rows are the last good ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hpcqwen import slurm
from hpcqwen.errors import HpcqwenError

DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 5.0
MAX_BACKOFF_S = 600.0
SLOW_SQUEUE_S = 10.0  # an answer slower than this counts as a strike, like a refusal
SQUEUE_TIMEOUT_S = 20.0
LOCK_WAIT_S = SQUEUE_TIMEOUT_S + 5  # longer than one squeue call: then the cache holds its answer
CACHE_VERSION = 1


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


def cache_dir() -> Path:
    """HPCQWEN_CACHE_DIR, else $XDG_CACHE_HOME/hpcqwen, else ~/.cache/hpcqwen."""
    if os.environ.get("HPCQWEN_CACHE_DIR"):
        return Path(os.environ["HPCQWEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcqwen"


def backoff_s(interval_s: float, strikes: int) -> float:
    """The wait before the next squeue: the interval, doubled per strike, capped."""
    return float(min(max(MAX_BACKOFF_S, interval_s), max(interval_s, MIN_INTERVAL_S) * 2.0 ** min(strikes, 16)))


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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, **data}), encoding="utf-8")
        tmp.replace(path)  # readers without the lock see the old file or the new one
    except OSError:
        pass  # a full disk: the next poll finds the cache due and asks again


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
    path = _cache_path(_usable(directory or cache_dir()))
    try:
        with FileLock(str(path.with_suffix(".lock")), timeout=LOCK_WAIT_S):
            return _poll_locked(path, interval_s, force, run, clock)
    except Timeout:
        # Another terminal is stuck in a squeue call: show what the cache has rather than
        # adding a call to a controller that is already slow.
        data = _read_json(path)
        return _rows_from(data), _status_from(data, 0)


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


def _poll_locked(path: Path, interval_s: float, force: bool, run: slurm.RunCmd,
                 clock: Callable[[], float]) -> tuple[list[slurm.JobRow], PollStatus]:
    data, now = _read_json(path), clock()
    strikes = int(data.get("strikes", 0))
    wait = MIN_INTERVAL_S if force and not strikes else backoff_s(interval_s, strikes)
    if data.get("attempted_at") is not None and now < data["attempted_at"] + wait:
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
            "error_since": None, "strikes": strikes, "duration_s": took,
            "next_at": now + backoff_s(interval_s, strikes)}
    _write_json(path, data)
    return rows, _status_from(data, 1)
