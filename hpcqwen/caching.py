"""Build-once cache entries on a shared filesystem (tokenized and packed datasets).

`cached()` may be called at once by any number of ranks on any number of nodes, of several users,
on filesystems whose `flock` is cluster-coherent or only node-local (DESIGN.md, "Shared caches",
says what a site must provide):

1. An entry `<root>/<key>/` is used only when it verifies (`entry_problem`): its `COMPLETE` marker,
   written last, lists every file with its size and sha256; its `key.json` hashes to `<key>`; it
   holds no symlinks and nothing writable by group or others; and, when another user owns it, its
   files still hash to the marker's digests (memoized per node, `hpcqwen.digests`). Nothing in an
   entry is executed or unpickled.
2. A missing entry is built under an exclusive `flock` on `<root>/<key>.lock` (mode 0666, so every
   user can take it; the kernel drops it when its holder dies). Waiters log whom they wait for,
   return as soon as the entry verifies, and give up after `CacheSettings.wait_s`.
3. The builder writes into `.<key>.tmp-<host>-<pid>-<random>/`, touched every HEARTBEAT_S; a temp
   folder is removed only when its builder is dead (same host, pid gone) or silent for STALE_TMP_S.
   Then modes are set, files fsynced, the marker written last, the folder renamed to `<key>`
   (atomic) and the parent fsynced. Losing that rename to an entry that verifies is success.
4. A broken entry of this user is replaced; one of another user is left alone, and this user's
   entry is built in its own namespace `<root>/.user-<uid>/` instead.

Test hook: HPCQWEN_TEST_CACHE_NO_LOCK=1 skips the flock, as on a filesystem where it is not
coherent across nodes (Lustre `localflock`, NFS `local_lock`); tests only, never on a cluster.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcqwen import fs
from hpcqwen.cache_entry import (
    COMPLETE_MARKER,
    KEY_FILE,
    LAYOUT_VERSION,
    MISSING,
    cache_key,
    canonical,
    entry_modes,
    entry_problem,
    marker_files,
)
from hpcqwen.digests import file_digest
from hpcqwen.errors import HpcqwenError

if TYPE_CHECKING:
    from hpcqwen.cluster import ClusterProfile

log = logging.getLogger(__name__)

NO_LOCK_ENV = "HPCQWEN_TEST_CACHE_NO_LOCK"  # test-only: behave as if flock were node-local
HEARTBEAT_S = 30.0
STALE_TMP_S = 600.0  # a temp folder untouched this long belongs to a dead (or frozen) builder
DEFAULT_WAIT_S = 7200.0
LOG_EVERY_S = 30.0
POLL_S = 0.5


class CacheError(HpcqwenError):
    """A cache folder that cannot be used, or a wait for another build that timed out."""

    reference = "cache"


@dataclass(frozen=True)
class CacheSettings:
    """How entries are shared and how long to wait for another process's build.

    Attributes:
        mode: Permission bits of entry folders (files get them without x); None follows the umask.
            Group and others never get write permission: entries are immutable.
        wait_s: Longest wait for another process's build before giving up with CacheError.
        log_every_s: Interval of the "waiting for <host:pid> building <key>" log lines.
    """

    mode: int | None = None
    wait_s: float = DEFAULT_WAIT_S
    log_every_s: float = LOG_EVERY_S

    @classmethod
    def from_profile(cls, profile: ClusterProfile) -> CacheSettings:
        """The settings of a cluster profile (`cache_mode`, `cache_wait_min`)."""
        mode = int(profile.cache_mode, 8) if profile.cache_mode else None
        return cls(mode=mode, wait_s=profile.cache_wait_min * 60)


def cached(
    key_parts: Mapping[str, Any],
    build: Callable[[Path], None],
    cache_root: str | Path,
    settings: CacheSettings = CacheSettings(),
) -> Path:
    """Return the verified entry for `key_parts`, building it exactly once across processes.

    Args:
        key_parts: JSON-able description of everything the entry's bytes depend on.
        build: Writes the entry's files into the folder it is given.
        cache_root: Shared cache folder (created if missing).
        settings: Entry permissions and the wait for another process's build.

    Returns:
        The entry folder: `cache_root/<key>`, or this user's `cache_root/.user-<uid>/<key>` when
        the shared one is another user's and does not verify.

    Raises:
        CacheError: When a cache folder is not writable, or the wait for another build times out.
    """
    root = Path(cache_root)
    key = cache_key(key_parts)
    own = root / f".user-{os.geteuid()}"
    problem = entry_problem(root / key, key)
    if problem is None:
        return root / key
    if entry_problem(own / key, key) is None:
        return own / key
    home = root
    if problem != MISSING and not _is_mine(root / key):
        log.warning("ignoring cache entry %s of another user (%s); using %s", root / key, problem, own)
        home = own
    return _build_once(home, key, key_parts, build, settings)


def _build_once(
    home: Path, key: str, key_parts: Mapping[str, Any], build: Callable[[Path], None], settings: CacheSettings
) -> Path:
    entry = home / key
    _make_home(home, settings.mode, shared=not home.name.startswith(".user-"))
    with _exclusive(home, key, settings) as locked:
        if not locked or entry_problem(entry, key) is None:
            return entry  # built by another process while we waited
        _remove_dead_temps(home, key)
        _set_aside(entry, key)
        tmp = _new_temp(home, key)
        try:
            with _heartbeat(tmp):
                log.info("building cache entry %s", entry)
                build(tmp)
            _seal(tmp, key, key_parts, settings.mode)
            _publish(tmp, entry, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def make_cache_root(root: Path, settings: CacheSettings = CacheSettings()) -> None:
    """Create the shared cache root as the first builder would (before a job that mounts it into a container).

    Raises:
        CacheError: When it exists but is not writable by this user.
    """
    _make_home(root, settings.mode, shared=True)


def _is_mine(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.geteuid()
    except OSError:
        return False


def _make_home(home: Path, mode: int | None, *, shared: bool) -> None:
    """Create the cache root (a drop box like /tmp) or this user's namespace; check we may write."""
    folder_mode, _ = entry_modes(mode)
    if not home.is_dir():
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            home.mkdir()
        except FileExistsError:
            pass
        else:  # only its creator sets the mode; sticky: nobody removes another user's entries
            if shared and folder_mode & 0o040:  # the group may read: it may add entries too
                folder_mode |= 0o020 | stat.S_ISGID
            os.chmod(home, folder_mode | (stat.S_ISVTX if shared else 0))
    if not os.access(home, os.W_OK | os.X_OK):
        st = home.stat()
        raise CacheError(
            f"cache folder {home} is not writable by this user (uid {os.geteuid()}); it belongs to uid "
            f"{st.st_uid}, mode {stat.filemode(st.st_mode)}",
            where=str(home),
            hint="share it with your group (chgrp GROUP DIR; chmod 3775 DIR), or set cluster.cache_root "
            "to a folder of your own",
        )


# ---- lock and waiting ----------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(home: Path, key: str, settings: CacheSettings) -> Iterator[bool]:
    """Hold `<key>.lock`; yields False instead when the entry appeared while waiting."""
    if os.environ.get(NO_LOCK_ENV) == "1":
        yield True
        return
    fd = _open_lock(home / f"{key}.lock")
    try:
        yield _wait_for_lock(fd, home, key, settings)
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """A descriptor to flock: read-write, or read-only where another user's lock file allows no more."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no symlinks; a planted FIFO must not block
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | flags)
        except FileNotFoundError:
            try:  # O_EXCL: never O_CREAT an existing file (fs.protected_regular refuses it in sticky dirs)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o666)
            except FileExistsError:
                continue
            os.fchmod(fd, 0o666)  # the umask must not lock the other users out
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheError(f"{path} is not a regular file", where=str(path), hint="remove it")
        return fd
    raise CacheError(f"could not open the lock file {path}", where=str(path))


def _wait_for_lock(fd: int, home: Path, key: str, settings: CacheSettings) -> bool:
    start = time.monotonic()
    next_log = start
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if entry_problem(home / key, key) is None:  # published by a builder that the lock did not stop
            return False
        waited = time.monotonic() - start
        if waited >= settings.wait_s:
            raise CacheError(
                f"gave up after {waited:.0f} s waiting for {_builder(home, key)} building cache entry {key}",
                where=str(home / key),
                hint="build the cache first with `hpcqwen prepare SPEC` (training can depend on that job), "
                "or raise cluster.cache_wait_min; if no build runs, find the process holding "
                f"{home / key}.lock (fuser -v)",
            )
        if time.monotonic() >= next_log:
            log.warning("waiting for %s building %s (%.0f s)", _builder(home, key), key, waited)
            next_log += settings.log_every_s
        time.sleep(min(POLL_S, settings.log_every_s))


def _builder(home: Path, key: str) -> str:
    """`host:pid` of the live builder of `key`, from its temp folder's name."""
    for tmp in sorted(home.glob(f".{key}.tmp-*"), key=lambda p: p.name):
        owner = _temp_owner(tmp.name)
        if owner and not _temp_is_dead(tmp):
            return f"{owner[0]}:{owner[1]}"
    return "the lock holder"


# ---- temp folders and publishing -----------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "unknown"


def _new_temp(home: Path, key: str) -> Path:
    tmp = home / f".{key}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)  # private until sealed
    return tmp


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from `.<key>.tmp-<host>-<pid>-<random>`; None for other names."""
    match = re.fullmatch(r"\.[0-9a-f]{64}\.tmp-([A-Za-z0-9._]+)-(\d+)-[0-9a-f]+", name)
    return (match.group(1), int(match.group(2))) if match else None


def _temp_is_dead(tmp: Path) -> bool:
    try:
        age = time.time() - tmp.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TMP_S:
        return True
    owner = _temp_owner(tmp.name)
    return owner is not None and owner[0] == _host() and not _pid_alive(owner[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_dead_temps(home: Path, key: str) -> None:
    for tmp in home.glob(f".{key}.tmp-*"):
        if _temp_is_dead(tmp):
            log.warning("removing %s: its builder is gone", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _set_aside(entry: Path, key: str) -> None:
    """Remove this user's broken entry (cached() only builds where the entry is missing or ours)."""
    problem = entry_problem(entry, key)
    if problem in (None, MISSING):
        return
    log.warning("replacing cache entry %s: %s", entry, problem)
    aside = entry.with_name(f".{key}.bad-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(entry, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()


@contextlib.contextmanager
def _heartbeat(folder: Path) -> Iterator[None]:
    """Touch `folder` every HEARTBEAT_S, so builders on other hosts see that its owner lives."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(folder)

    thread = threading.Thread(target=beat, name="hpcqwen-cache-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _seal(tmp: Path, key: str, key_parts: Mapping[str, Any], mode: int | None) -> None:
    """key.json, modes, fsync, then the marker listing every file's size and sha256, last."""
    (tmp / KEY_FILE).write_text(canonical(key_parts), encoding="utf-8")
    folder_mode, file_mode = entry_modes(mode)
    files: dict[str, list[Any]] = {".": [0, ""]}
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in filenames:
            path = Path(dirpath) / name
            os.chmod(path, file_mode)
            files[path.relative_to(tmp).as_posix()] = [path.stat().st_size, file_digest(path)]
            fs.fsync_file(path)
        for name in dirnames:
            os.chmod(Path(dirpath) / name, folder_mode)
            files[(Path(dirpath) / name).relative_to(tmp).as_posix()] = [0, ""]
        fs.fsync_dir(dirpath)
    marker = tmp / COMPLETE_MARKER
    fs.write_atomic(marker, json.dumps({"layout": LAYOUT_VERSION, "key": key, "files": files}, indent=1,
                                       sort_keys=True))
    os.chmod(marker, file_mode)
    os.chmod(tmp, folder_mode)


def _publish(tmp: Path, entry: Path, key: str) -> None:
    """Rename `tmp` to `entry`; losing the race to an entry that verifies is success."""
    try:
        os.rename(tmp, entry)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EPERM, errno.EACCES, errno.EBUSY):
            raise
        problem = entry_problem(entry, key)
        if problem is not None:
            raise CacheError(f"could not publish cache entry {entry} ({e.strerror}): the folder there "
                             f"is {problem}", where=str(entry), hint="remove it, then run again") from e
        same = marker_files(tmp) == marker_files(entry)
        log.log(logging.INFO if same else logging.WARNING, "another builder published %s first (%s)", entry,
                "identical bytes" if same else "different bytes: the build is not reproducible")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    fs.fsync_dir(entry.parent)
