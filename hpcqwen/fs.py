"""Files on the shared filesystem written so that a crash or a reader never sees half of them.

One home for the rules every writer follows (checkpoints, caches, distill shards, run dirs,
metrics): a file is replaced atomically (temp file in the same folder + fsync + rename + fsync
of the folder), a tree is made durable by fsyncing every file AND every directory in it (a
rename or a new name lives in the directory, so fsyncing the files alone does not persist it),
and a "complete" marker is written only after the tree it vouches for is durable.

On NFS and Lustre, fsync flushes the dirty pages of THIS client only: every node fsyncs what it
wrote itself before the barrier that precedes a marker (see runners/callbacks.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Persist a directory's entries (new names, renames); a no-op where directories cannot be
    opened or fsynced (some network filesystems refuse it: the rename itself is then the best we get)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> int:
    """fsync every regular file and every directory under `root` (root included); returns the
    number of files. Files that vanish meanwhile (another rank pruning) are skipped."""
    count = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                fsync_file(path)
                count += 1
        fsync_dir(dirpath)
    return count


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = True, mode: int | None = None) -> None:
    """Replace `path` with `data` so that readers see the old content or the new, never a part.

    Args:
        path: The file to write.
        data: Text (UTF-8) or bytes.
        durable: fsync the file before the rename and the folder after it (a crash then keeps
            the new content); False for files that are cheap to lose (progress hints).
        mode: Permission bits for the new file (default: 0o666 minus the umask, as open() does).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_json_atomic(path: str | Path, value: Any, *, durable: bool = True) -> None:
    """`write_atomic` of one JSON document (with a trailing newline)."""
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True, default=str) + "\n", durable=durable)


def read_json(path: str | Path) -> Any:
    """A JSON file's value, or None when it is missing or not valid JSON (files on a shared
    filesystem may be half-written by an older writer or edited by hand: never a crash)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def append_line(path: str | Path, line: str, *, durable: bool = False) -> None:
    """Append one line with a single write() call (a reader never sees half of it on a local
    filesystem). O_APPEND is not atomic across NFS clients: give each writer its own file."""
    text = line.rstrip("\n") + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, text.encode("utf-8"))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
