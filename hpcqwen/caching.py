"""Build-once cache entries on the shared filesystem (tokenized and packed datasets).

Protocol for `cached()`, chosen so that any number of ranks on any number of nodes may call it:
1. An entry `cache_root/<key>/` counts only if its marker `COMPLETE` exists; readers never look
   at anything else, so a half-written entry can never be read.
2. A missing entry is built under an exclusive lock `cache_root/<key>.lock`. filelock uses
   `flock`, which the kernel drops when the holder dies (even on SIGKILL), so a crashed builder
   never blocks the others. (On Lustre the filesystem must be mounted with `-o flock`; NFSv4
   emulates flock with POSIX locks.)
3. The builder writes into a fresh `.<key>.tmp-*` folder, fsyncs every file, writes the marker
   last, then `os.rename`s the folder to `<key>` (atomic within one filesystem) and fsyncs the
   parent. Leftover temp folders of crashed builders are removed by the next lock holder.
4. Everyone else waits on the lock, sees the marker, and memory-maps the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the bytes written for the same inputs change (format, masking or packing rules).
DATA_VERSION = 2  # 2: ignore_empty_think keeps the loss of an answer token that starts inside the block
COMPLETE_MARKER = "COMPLETE"
KEY_FILE = "key.json"
# Files of a model folder that decide tokenization; weights are left out (they don't, and are huge).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer_dir: str | Path) -> dict[str, str]:
    """Content hashes of the tokenizer files present in a model or tokenizer folder."""
    folder = Path(tokenizer_dir)
    return {
        name: file_digest(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()
    }


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `key_parts` plus `DATA_VERSION`."""
    canonical = json.dumps({"data_version": DATA_VERSION, **key_parts}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dataset_key_parts(
    refs: Iterable[str],
    *,
    data_files: Iterable[str | Path],
    tokenizer_dir: str | Path,
    chat_template: str,
    max_length: int,
    loss_scale: str,
    packing: bool,
    enable_thinking: bool | None,
    seed: int,
    model_name: Any = None,
    model_author: Any = None,
    system: str | None = None,
) -> dict[str, Any]:
    """Everything that changes the bytes of a prepared SFT dataset, ready for `cache_key`.

    Data files enter by content hash, not path or mtime, so a copy of the same data on another
    filesystem hits the same entry and an edited file never hits a stale one.
    """
    return {
        "kind": "sft",
        "refs": list(refs),
        "data": sorted(file_digest(p) for p in data_files),
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "chat_template": hashlib.sha256(chat_template.encode("utf-8")).hexdigest(),
        "max_length": max_length,
        "loss_scale": loss_scale,
        "packing": packing,
        "enable_thinking": enable_thinking,
        "seed": seed,
        "model_name": model_name,
        "model_author": model_author,
        "system": system,
    }


def is_complete(entry: Path) -> bool:
    """True when `entry` was fully built (its marker exists)."""
    return (entry / COMPLETE_MARKER).is_file()


def cached(
    key_parts: Mapping[str, Any],
    build: Callable[[Path], None],
    cache_root: str | Path,
    *,
    timeout_s: float = -1,
) -> Path:
    """Return the complete entry for `key_parts`, building it exactly once across processes.

    Args:
        key_parts: JSON-able description of everything the entry's bytes depend on.
        build: Writes the entry's files into the folder it is given.
        cache_root: Shared cache folder (created if missing).
        timeout_s: Longest wait for another process's build; -1 waits for ever (builds of big
            datasets take long, and a dead builder releases the lock anyway).

    Returns:
        The entry folder `cache_root/<key>`.

    Raises:
        filelock.Timeout: When `timeout_s` passes while another process builds.
    """
    from filelock import FileLock

    root = Path(cache_root)
    key = cache_key(key_parts)
    entry = root / key
    if is_complete(entry):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock"), timeout=timeout_s):
        if is_complete(entry):  # another process built it while we waited
            return entry
        _remove_leftovers(root, key)
        _build_entry(root, key, key_parts, build)
    return entry


def _remove_leftovers(root: Path, key: str) -> None:
    """Only the lock holder gets here, so any temp folder or unmarked entry is a dead build's."""
    for stale in [*root.glob(f".{key}.tmp-*"), root / key]:
        if stale.exists():
            log.warning("removing incomplete cache entry %s (a build crashed)", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _build_entry(
    root: Path, key: str, key_parts: Mapping[str, Any], build: Callable[[Path], None]
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        log.info("building cache entry %s", root / key)
        build(tmp)
        (tmp / KEY_FILE).write_text(
            json.dumps(dict(key_parts), indent=1, sort_keys=True, default=str)
        )
        _fsync_tree(tmp)
        _write_synced(tmp / COMPLETE_MARKER, f"data_version={DATA_VERSION}\n")
        os.rename(tmp, root / key)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist directory entries (new names, renames); a no-op where directories can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
