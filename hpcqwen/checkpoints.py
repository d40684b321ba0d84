"""Checkpoints on the shared filesystem: a checkpoint counts only when its marker exists.

Layout: `<task dir>/checkpoints/checkpoint-<step>/` (Hugging Face's naming, so transformers
and peft read them as they are). The marker `hpcqwen-complete.json` is written last, after
every file of the checkpoint has been fsynced, so a node that dies mid-save leaves a folder
that `latest_complete` skips. Resume resolves the newest complete one at job start, whatever
the job id; pruning never deletes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MARKER = "hpcqwen-complete.json"
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """`root/checkpoint-<step>`."""
    return root / f"checkpoint-{step}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name, or None for other names."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(path: Path, info: dict[str, Any] | None = None) -> None:
    """fsync every file of the checkpoint, then write the marker (tmp + fsync + rename)."""
    _fsync_tree(path)
    body = {"step": step_of(path), "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **(info or {})}
    tmp = path / f".{MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(body) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path / MARKER)
    _fsync_dir(path)


def is_complete(path: Path) -> bool:
    """The checkpoint's marker exists."""
    return (path / MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Every checkpoint-<step> folder, oldest step first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found, key=lambda sp: sp[0] or 0)]


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    complete = [p for p in list_checkpoints(root) if is_complete(p)]
    return complete[-1] if complete else None


def prune(root: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` and incomplete ones older than the
    newest complete one; the newest complete checkpoint is never deleted. Returns what went."""
    newest = latest_complete(root)
    if newest is None:
        return []
    newest_step = step_of(newest) or 0
    doomed = [p for p in list_checkpoints(root) if not is_complete(p) and (step_of(p) or 0) < newest_step]
    if keep is not None:
        complete = [p for p in list_checkpoints(root) if is_complete(p)]
        doomed += complete[: max(0, len(complete) - max(keep, 1))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
