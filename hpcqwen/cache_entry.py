"""A cache entry on disk: its key, its marker, its permissions, and whether it can be trusted.

An entry `<key>/` holds the files its builder wrote, `key.json` (the canonical JSON of its key parts,
whose sha256 is `<key>`) and, written last, `COMPLETE`: JSON listing every file and folder with its
size and sha256. `entry_problem` says whether an entry can be used (DESIGN.md, "Shared caches",
gives the trust model); `entry_modes` gives the permissions the builder sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpcqwen.digests import file_digests

LAYOUT_VERSION = 2  # bump when the entry layout (marker, key file) changes
COMPLETE_MARKER = "COMPLETE"
KEY_FILE = "key.json"
MISSING = "missing"


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `key_parts` (the text stored as the entry's key.json)."""
    return hashlib.sha256(canonical(key_parts).encode("utf-8")).hexdigest()


def canonical(key_parts: Mapping[str, Any]) -> str:
    """The key parts as sorted, compact JSON with the layout version: the bytes of key.json."""
    return json.dumps({"layout": LAYOUT_VERSION, **key_parts}, sort_keys=True, default=str)


def entry_problem(entry: Path, key: str) -> str | None:
    """None when `entry` is a complete, intact entry for `key`; else what is wrong with it.

    Returns:
        None, `MISSING`, or a short reason (no marker, a mismatching key, a changed file, ...).
    """
    try:
        st = entry.lstat()
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    try:
        return _verify(entry, key, st.st_uid)
    except FileNotFoundError as e:
        return f"{Path(e.filename or '?').name} is missing (a build crashed, is under way, or was removed)"
    except (OSError, ValueError) as e:
        return f"cannot be read ({getattr(e, 'strerror', None) or e})"


def _verify(entry: Path, key: str, owner: int) -> str | None:
    marker = json.loads((entry / COMPLETE_MARKER).read_text(encoding="utf-8"))
    recorded = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(recorded, dict) or marker.get("key") != key:
        return "its COMPLETE marker is not this key's"
    found = _listing(entry)
    if set(found) != set(recorded):
        return f"its files differ from those its marker lists ({sorted(set(found) ^ set(recorded))[:3]})"
    for rel, st in [*found.items(), (COMPLETE_MARKER, (entry / COMPLETE_MARKER).lstat())]:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return f"{rel} is neither a file nor a folder"
        if st.st_uid != owner or st.st_mode & 0o022:
            return f"{rel} is writable by others than the entry's owner"
        if stat.S_ISREG(st.st_mode) and rel in recorded and st.st_size != recorded[rel][0]:
            return f"{rel} has {st.st_size} bytes, not {recorded[rel][0]}"
    if hashlib.sha256((entry / KEY_FILE).read_bytes()).hexdigest() != key:
        return "its key.json does not hash to its name"
    if owner != os.geteuid():  # we did not write it: its bytes must match its marker
        names = sorted(rel for rel, st in found.items() if stat.S_ISREG(st.st_mode))
        for rel, digest in zip(names, file_digests(entry / rel for rel in names), strict=True):
            if digest != recorded[rel][1]:
                return f"{rel} does not hash to its recorded sha256"
    return None


def _listing(entry: Path) -> dict[str, os.stat_result]:
    """lstat of the entry folder ('.'), its subfolders and files, except the marker (listed nowhere)."""
    found = {".": entry.lstat()}
    for dirpath, dirnames, filenames in os.walk(entry):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(entry).as_posix()
            if rel != COMPLETE_MARKER:
                found[rel] = path.lstat()
    return found


def marker_files(entry: Path) -> Any:
    """The files an entry's marker lists: {relative path: [size, sha256]}."""
    return json.loads((entry / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]



def entry_modes(mode: int | None) -> tuple[int, int]:
    """(folder mode, file mode) of entries: `mode` or the umask's, never writable by group/others."""
    base = mode if mode is not None else 0o777 & ~_umask()
    folder = (base | 0o700) & 0o755
    return folder, folder & 0o644


def _umask() -> int:
    try:  # Linux >= 4.7 reports it; setting it to read it back would race with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current
