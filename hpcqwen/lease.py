"""One live launch per task dir (and per Megatron `save` folder): a lease file that a dead holder releases.

A lease is a small JSON file (`host`, `pid`, `job_id`, `restart`, `since`) whose mtime the holder
refreshes every `ttl_s / 4` seconds from a daemon thread. It does not rely on `flock`, which is
not coherent across nodes on every cluster filesystem (Lustre `localflock`, NFS `local_lock`).
A lease is free when the file is missing, when its holder stopped refreshing it for `ttl_s`,
when the holder runs on this host and its process is gone, or when the holder is an earlier
incarnation of the same Slurm job (Slurm starts a requeued job only after the old one ended).
Taking a lease is `link()` (atomic create, also on NFS) or, over a free one, `replace()` followed
by a re-read after a short pause, so of two racers only one keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcqwen.errors import HpcqwenError

DEFAULT_TTL_S = 180.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a lease."""

    host: str
    pid: int
    job_id: str
    restart: int = 0
    since: float = 0.0

    def describe(self) -> str:
        """`job 123 (restart 1) on n1, pid 4242`."""
        return f"job {self.job_id} (restart {self.restart}) on {self.host}, pid {self.pid}"


class LeaseHeld(HpcqwenError):
    """Another live launch holds the lease."""

    reference = "lease"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in `path`, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data["job_id"]), int(data.get("restart", 0)),
                      float(data.get("since", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """A process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_free(path: Path, me: Holder, ttl_s: float, now: float | None = None) -> tuple[bool, Holder | None]:
    """(free?, current holder) for `me` wanting the lease at `path`."""
    holder = read_holder(path)
    if holder is None:
        return True, None
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return True, None
    if holder.job_id == me.job_id and (holder.host, holder.pid) != (me.host, me.pid):
        return True, holder  # an earlier incarnation of this job: Slurm ended it before this one started
    if (holder.host, holder.pid) == (me.host, me.pid):
        return True, holder
    if age > ttl_s:
        return True, holder
    if holder.host == me.host and not pid_alive(holder.pid):
        return True, holder
    return False, holder


class Lease:
    """A held lease; `release()` (or the context manager) gives it up."""

    def __init__(self, path: Path, holder: Holder, ttl_s: float) -> None:
        self.path, self.holder, self.ttl_s = path, holder, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_refreshing(self) -> None:
        """Refresh the lease's mtime from a daemon thread until `release`."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                with contextlib.suppress(OSError):
                    os.utime(self.path)
        self._thread = threading.Thread(target=loop, name="hpcqwen-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and remove the file if it is still ours."""
        self._stop.set()
        if read_holder(self.path) == self.holder:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(path: Path, job_id: str, restart: int = 0, *, what: str, ttl_s: float = DEFAULT_TTL_S,
            settle_s: float = 0.2) -> Lease:
    """Take the lease at `path` for this process, or raise LeaseHeld naming the live holder.

    Args:
        path: The lease file.
        job_id: This launch's job id (a requeued job keeps its id).
        restart: This launch's restart count (for the message only).
        what: What the lease protects, for the message ("run dir /x", "megatron save folder /y").
        ttl_s: A holder that has not refreshed the file for this long is dead.
        settle_s: Pause before re-reading after replacing a free lease (racers overwrite each other).
    """
    me = Holder(socket.gethostname(), os.getpid(), job_id, restart, time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{me.host}.{me.pid}.tmp")
    tmp.write_text(json.dumps(asdict(me)) + "\n", encoding="utf-8")
    try:
        try:
            os.link(tmp, path)
            return Lease(path, me, ttl_s)
        except FileExistsError:
            pass
        free, holder = is_free(path, me, ttl_s)
        if not free and holder is not None:
            raise LeaseHeld(f"{what} is in use by {holder.describe()}",
                            where=str(path), hint="wait for it to end or cancel it (`hpcqwen cancel`); a "
                            f"dead holder's lease expires {ttl_s:.0f} s after its last refresh")
        os.replace(tmp, path)
        time.sleep(settle_s)
        if read_holder(path) != me:
            winner = read_holder(path)
            raise LeaseHeld(f"{what} was taken at the same moment by "
                            f"{winner.describe() if winner else 'another launch'}", where=str(path))
        return Lease(path, me, ttl_s)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
