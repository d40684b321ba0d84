"""Checkpoints on the shared filesystem: a checkpoint counts only when its marker exists.

Layout: `<task dir>/checkpoints/checkpoint-<step>/` (Hugging Face's naming, so transformers
and peft read them as they are). The marker `hpcqwen-complete.json` is written last by rank 0,
after every node fsynced what it wrote (`hpcqwen.fs.fsync_tree`) and all ranks met at a barrier,
so a node that dies mid-save leaves a folder that `latest_complete` skips. The marker also
carries the run's counters at that step (tokens seen, training seconds, how long the save took),
which a resumed run continues from. Resume resolves the newest complete checkpoint at job start
(rank 0 decides, every rank uses its choice); pruning runs after the marker, off the training
thread, and never deletes the newest complete checkpoint.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcqwen import fs
from hpcqwen.paths import SAVES

MARKER = "hpcqwen-complete.json"
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """`root/checkpoint-<step>`."""
    return root / f"checkpoint-{step}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name, or None for other names."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def mark_complete(path: Path, info: dict[str, Any] | None = None, *, synced: bool = False) -> None:
    """Write the marker (atomic, durable) after the checkpoint's files are durable.

    Args:
        path: The checkpoint folder.
        info: Extra fields for the marker (counters at this step).
        synced: Every node already fsynced what it wrote (multi-node savers do that before their
            barrier); otherwise this process fsyncs the whole tree first.
    """
    if not synced:
        fs.fsync_tree(path)
    body = {"step": step_of(path), "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **(info or {})}
    fs.write_atomic(path / MARKER, json.dumps(body) + "\n")
    fs.fsync_dir(path.parent)
    # The markers of pruned checkpoints go with them; this log keeps every save for `hpcqwen cost`.
    save = {"step": body.get("step"), "time": round(time.time(), 3), "save_s": body.get("save_s")}
    fs.append_line(path.parent / SAVES, json.dumps(save))


def read_marker(path: Path) -> dict[str, Any]:
    """A complete checkpoint's marker fields ({} when unreadable)."""
    data = fs.read_json(path / MARKER)
    return data if isinstance(data, dict) else {}


def is_complete(path: Path) -> bool:
    """The checkpoint's marker exists."""
    return (path / MARKER).is_file()


StepOf = Callable[[Path], "int | None"]


def list_checkpoints(root: Path, step_of: StepOf = step_of) -> list[Path]:
    """Every checkpoint folder under `root` (named as `step_of` reads them), oldest step first,
    complete or not. Megatron's `iter_<n>` folders pass `hpcqwen.megatron.checkpoint.iteration_of`."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found, key=lambda sp: sp[0] or 0)]


def latest_complete(root: Path, step_of: StepOf = step_of) -> Path | None:
    """The newest complete checkpoint, or None."""
    complete = [p for p in list_checkpoints(root, step_of) if is_complete(p)]
    return complete[-1] if complete else None


def prune(root: Path, keep: int | None, step_of: StepOf = step_of) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` and incomplete ones older than the
    newest complete one (crashed saves); the newest complete checkpoint is never deleted, nor an
    incomplete one newer than it (a save may be under way). Returns what went."""
    newest = latest_complete(root, step_of)
    if newest is None:
        return []
    newest_step = step_of(newest) or 0
    folders = list_checkpoints(root, step_of)
    doomed = [p for p in folders if not is_complete(p) and (step_of(p) or 0) < newest_step]
    if keep is not None:
        complete = [p for p in folders if is_complete(p)]
        doomed += complete[: max(0, len(complete) - max(keep, 1))]
    for p in doomed:
        (p / MARKER).unlink(missing_ok=True)  # incomplete first: a prune cut short never leaves a "complete" husk
        shutil.rmtree(p, ignore_errors=True)
    return doomed


class Pruner:
    """Deletes old checkpoints in one background thread (rank 0), one pruning at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, root: Path, keep: int | None) -> None:
        """Prune `root` down to `keep` complete checkpoints (`prune`) in the background."""
        self.start_with(prune, root, keep)

    def start_with(self, prune: Any, root: Path, keep: int | None) -> None:
        """Run `prune(root, keep)` in the background (after the previous pruning ended)."""
        self.join()
        self._thread = threading.Thread(target=prune, args=(root, keep), name="hpcqwen-prune", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the running pruning (call before the process exits)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
