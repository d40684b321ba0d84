"""What `hpcqwen queue` shows of the watchdog: STALLED (age of the oldest heartbeat, its phase), stragglers,
a reported hang — read from the watcher's `TASK_DIR/WATCHDOG.json` (ages on the watcher's own clock, plus
the file's age here, so the nodes' clock skew does not enter)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hpcqwen import fs
from hpcqwen.paths import WATCHDOG

STALL_CAP_S = 300.0  # STALLED after half the allowance, but at most this long without a heartbeat


def stalled_after(allowance_s: float, poll_s: float) -> float:
    """Seconds without a heartbeat after which a running rank shows as STALLED."""
    return max(2 * poll_s, min(allowance_s / 2, STALL_CAP_S))


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def alert_of(data: Any, file_age_s: float) -> str:
    """Pure: the alert text of one WATCHDOG.json content whose file is `file_age_s` old ('' when all is well)."""
    if not isinstance(data, dict):
        return ""
    parts = []
    oldest, poll = data.get("oldest"), float(data.get("poll_s") or 10)
    if isinstance(oldest, dict) and isinstance(oldest.get("age_s"), (int, float)):
        age = float(oldest["age_s"]) + max(0.0, file_age_s)
        if age >= stalled_after(float(oldest.get("allowance_s") or 900), poll):
            parts.append(f"STALLED {_age(age)}: no heartbeat from rank {oldest.get('rank')} ({oldest.get('host')}) "
                         f"in {oldest.get('phase')} at step {oldest.get('step')}")
    for s in data.get("stragglers") or []:
        if isinstance(s, dict):
            parts.append(f"straggler: rank {s.get('rank')} ({s.get('host')}) {s.get('ratio')}x the median")
    if data.get("report"):
        parts.append(f"hang reported: {data['report']}")
    return " · ".join(parts)


def watch_alert(task_dir: Path, now: float | None = None) -> str:
    """The alert of a running task ('' without a WATCHDOG.json)."""
    path = task_dir / WATCHDOG
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return ""
    return alert_of(fs.read_json(path), (now or time.time()) - mtime)
