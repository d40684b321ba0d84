"""Heartbeats: one small file per rank saying how far it got, written at a bounded rate, read by the watcher.

`TASK_DIR/heartbeats/<host>-<rank>.json` holds `step`, `phase`, `beats` (how many times the rank reported
progress), the writer's pid, monotonic and wall time, `work_s` (the mean of its recent steps' forward time,
for straggler detection) and the signal its faulthandler dumps stacks on. The launcher writes it for the
phases before a rank runs (starting, rendezvous, loading); from then on the rank itself (`Heartbeat`,
started by `start_rank`), from the runners' callbacks: data, forward, backward, optimizer, eval, generate,
save, finishing. A beat is a `time.monotonic()` call and a comparison; the file is replaced (atomically,
not fsynced: losing one costs nothing) at most once per interval, except on entering or leaving `save`,
which is written at once because it changes the rank's allowance; a beat that came within the interval is
written by a small daemon thread once the interval has passed (it writes only what the rank recorded, so a
stuck rank's file holds its true last step and phase, and never shows progress it did not make). No GPU
work, no collective.

The watcher never compares remote timestamps: it notes, on its own clock, when each file last changed
(`hpcqwen.watchdog`), and subtracts the writer's own delay between the beat and the write (`lag_s`, two
readings of the writer's monotonic clock), so clock skew between nodes does not matter.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hpcqwen import fs
from hpcqwen.paths import TaskPaths

STARTUP_PHASES = ("starting", "rendezvous", "loading")
STEP_PHASES = ("data", "forward", "backward", "optimizer", "eval", "generate", "save", "finishing")
EXITED = "exited"  # written at the rank's exit (atexit): a rank that finished early is not hung
FORCE_PHASES = ("save",)  # entering or leaving them changes the allowance: written at once
# SIGRTMIN+6: no library uses it (USR2 and TERM are stop signals here; NCCL may use USR1, as submitit notes).
DUMP_SIGNAL = signal.SIGRTMIN + 6
WORK_WINDOW = 8  # steps in the work-time mean
ENV_ON, ENV_INTERVAL = "HPCQWEN_WATCHDOG", "HPCQWEN_HEARTBEAT_INTERVAL_S"
ENV_HOST, ENV_TIMEOUT = "HPCQWEN_NODE_NAME", "HPCQWEN_COLLECTIVE_TIMEOUT_S"


def file_name(host: str, rank: int) -> str:
    """`<host>-<rank>.json`."""
    return f"{host}-{rank}.json"


@dataclass
class Heartbeat:
    """The heartbeat file of one rank (written by the rank, or by its launcher before the rank runs)."""

    path: Path
    job_id: str
    restart: int
    rank: int
    host: str
    interval_s: float
    source: str = "rank"
    dump_signal: int | None = None
    pid: int = 0
    step: int = -1
    phase: str = "starting"
    beats: int = 0
    _written_at: float = -1e18
    _beat_at: float = 0.0
    _work: float = 0.0
    pending: bool = False

    def __post_init__(self) -> None:
        self.pid = self.pid or os.getpid()
        self.window: deque[float] = deque(maxlen=WORK_WINDOW)
        self.lock = threading.Lock()

    def beat(self, phase: str, step: int | None = None, *, force: bool = False) -> None:
        """Record progress; write the file when the interval has passed (or at once for `force` and save)."""
        now = time.monotonic()
        with self.lock:
            self.beats += 1
            changed_allowance = (phase in FORCE_PHASES) != (self.phase in FORCE_PHASES)
            self.phase, self._beat_at, self.pending = phase, now, True
            if step is not None:
                self.step = step
        if force or changed_allowance or now - self._written_at >= self.interval_s:
            self.write(now)

    def flush_loop(self) -> None:
        """Write a beat that came within the interval once the interval has passed (a daemon thread)."""
        while True:
            time.sleep(self.interval_s / 2)
            if self.pending and time.monotonic() - self._written_at >= self.interval_s:
                self.write()

    def add_work(self, seconds: float) -> None:
        """Add one forward pass's time to this step's work."""
        self._work += seconds

    def end_step(self) -> None:
        """Close this step's work time into the window the mean is taken over."""
        if self._work > 0:
            self.window.append(self._work)
        self._work = 0.0

    @property
    def work_s(self) -> float | None:
        """Mean work per step over the last steps (None before 3 steps were measured)."""
        return round(sum(self.window) / len(self.window), 6) if len(self.window) >= 3 else None

    def record(self, now: float) -> dict[str, Any]:
        """The file's content (`lag_s`: how long before this write the last beat came)."""
        return {"job_id": self.job_id, "restart": self.restart, "rank": self.rank, "host": self.host,
                "pid": self.pid, "source": self.source, "step": self.step, "phase": self.phase, "beats": self.beats,
                "lag_s": round(max(0.0, now - self._beat_at), 3), "wall": round(time.time(), 3),
                "work_s": self.work_s, "dump_signal": self.dump_signal}

    def write(self, now: float | None = None) -> None:
        """Replace the file now (a failed write is skipped: the next beat tries again)."""
        with self.lock:
            now = time.monotonic() if now is None else now
            self._written_at, self.pending = now, False
            text = json.dumps(self.record(now)) + "\n"
        with contextlib.suppress(OSError):
            fs.write_atomic(self.path, text, durable=False)


_RANK: Heartbeat | None = None
_STACKS: IO[str] | None = None


def start_rank(task_dir: Path) -> Heartbeat | None:
    """This rank's heartbeat, when the launcher turned the watchdog on (HPCQWEN_WATCHDOG=1); also registers
    a faulthandler stack dump on DUMP_SIGNAL into `<host>-<rank>.stacks`, the launcher's fallback when
    py-spy cannot attach. Returns None when the watchdog is off."""
    global _RANK, _STACKS
    if os.environ.get(ENV_ON) != "1":
        return None
    if _RANK is not None:
        return _RANK
    host = os.environ.get(ENV_HOST) or socket.gethostname()
    rank = int(os.environ.get("RANK", "0"))
    folder = TaskPaths(task_dir).heartbeats
    folder.mkdir(parents=True, exist_ok=True)
    dump_signal = None
    try:
        _STACKS = open(folder / f"{host}-{rank}.stacks", "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        faulthandler.register(DUMP_SIGNAL, file=_STACKS, all_threads=True, chain=False)
        dump_signal = int(DUMP_SIGNAL)
    except (OSError, RuntimeError, ValueError):
        dump_signal = None
    _RANK = Heartbeat(folder / file_name(host, rank), os.environ.get("HPCQWEN_JOB_ID", "local"),
                      int(os.environ.get("HPCQWEN_RESTART_COUNT", "0") or 0), rank, host,
                      float(os.environ.get(ENV_INTERVAL, "10") or 10), dump_signal=dump_signal)
    _RANK.beat("loading", force=True)
    atexit.register(_RANK.beat, EXITED, force=True)
    threading.Thread(target=_RANK.flush_loop, name="hpcqwen-heartbeat", daemon=True).start()
    return _RANK


def current() -> Heartbeat | None:
    """This process's heartbeat (None when the watchdog is off or `start_rank` was not called)."""
    return _RANK


def beat(phase: str, step: int | None = None, *, force: bool = False) -> None:
    """Report progress from any code of a rank (a `command` task's module may call it too); a no-op when off."""
    if _RANK is not None:
        _RANK.beat(phase, step, force=force)


def collective_timeout_s(default: float) -> float:
    """The collective timeout the launcher chose (longer than every watchdog allowance), else `default`."""
    value = os.environ.get(ENV_TIMEOUT, "")
    try:
        return float(value) if value else default
    except ValueError:
        return default


def read_all(folder: Path, job_id: str, restart: int) -> dict[int, dict[str, Any]]:
    """The heartbeats of one attempt by rank (files of earlier attempts, and unreadable ones, are skipped)."""
    out: dict[int, dict[str, Any]] = {}
    try:
        names = [p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    except OSError:
        return out
    for path in names:
        data = fs.read_json(path)
        if isinstance(data, dict) and data.get("job_id") == job_id and data.get("restart") == restart \
                and isinstance(data.get("rank"), int):
            out[data["rank"]] = data
    return out
