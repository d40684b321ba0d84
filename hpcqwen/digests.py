"""Content hashes of files, computed once per node and user: a memo keyed by each file's identity.

Every rank of a job needs the digests of the same data and tokenizer files to find its cache
entry (`hpcqwen.caching`). `file_digests` hashes under a node-local lock and records each digest in
a private memo, so the first process on a node reads the files and the other ranks of that node
(and later jobs there) get the digests from the memo without reading them.

The memo is keyed by (real path, device, inode, size, mtime_ns, ctime_ns). Any write changes
ctime, which users cannot set, so an edited file always misses the memo, even when its size and
mtime were restored. The memo lives in `$TMPDIR/hpcqwen-digests-<uid>/` (node-local, mode 0700):
it is used only when that folder belongs to this user and nobody else can write to it, since a
planted digest would make a foreign cache entry look like ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Iterable[str | Path]) -> list[str]:
    """sha256 of each file, in order, from this node's memo where the file is unchanged.

    Args:
        paths: Files to hash.

    Returns:
        One hex digest per path.
    """
    files = [Path(p) for p in paths]
    memo = memo_dir()
    if memo is None:
        return [file_digest(p) for p in files]
    with _node_lock(memo / "lock"):  # the other ranks of this node wait here, then hit the memo
        return [_memo_digest(memo, p) for p in files]


def memo_dir() -> Path | None:
    """This user's node-local memo folder, created if missing; None when it cannot be trusted."""
    folder = Path(tempfile.gettempdir()) / f"hpcqwen-digests-{os.geteuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    return folder if private else None


def _memo_digest(memo: Path, path: Path) -> str:
    st = path.stat()
    identity = f"{path.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    slot = memo / hashlib.sha256(identity.encode()).hexdigest()
    try:
        recorded = slot.read_text().strip()
        if len(recorded) == 64:
            return recorded
    except OSError:
        pass
    digest = file_digest(path)
    tmp = slot.with_name(f".{slot.name}.{os.getpid()}")
    tmp.write_text(digest + "\n")
    os.replace(tmp, slot)  # a reader never sees half a digest
    return digest


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """flock on a node-local file (coherent: one kernel), released when the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
