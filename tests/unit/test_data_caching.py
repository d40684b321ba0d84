"""The shared cache under real processes and a real file lock: one build, crashes leave nothing, entries
are shared with the right permissions and verified, and waiters say whom they wait for."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hpcqwen.caching import (
    COMPLETE_MARKER,
    STALE_TMP_S,
    CacheError,
    CacheSettings,
    cache_key,
    cached,
    entry_problem,
)

KEY = {"kind": "test", "n": 1000}


def _build_array(folder: Path) -> None:
    """A build that takes long enough for every racer to arrive while it runs."""
    import numpy as np

    with open(folder.parent / "builds.log", "a") as log:  # O_APPEND: one line per build
        log.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    np.save(folder / "data.npy", np.arange(KEY["n"], dtype=np.int64) * 3)


def _race(root: str, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    import numpy as np

    barrier.wait()
    entry = cached(KEY, _build_array, root)
    data = np.load(entry / "data.npy", mmap_mode="r")  # every racer memory-maps the one copy
    results.put((os.getpid(), str(entry), int(data.sum()), isinstance(data, np.memmap)))


def _killed_mid_build(folder: Path) -> None:
    (folder / "half-written.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)


def _crash(root: str) -> None:
    cached(KEY, _killed_mid_build, root)


def test_four_racing_processes_build_once_and_read_the_same_data(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    got = [results.get(timeout=5) for _ in procs]
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1
    assert len({pid for pid, *_ in got}) == 4
    assert {(entry, total, mapped) for _, entry, total, mapped in got} == {
        (str(tmp_path / cache_key(KEY)), 3 * sum(range(KEY["n"])), True)
    }
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_failing_build_leaves_no_entry_and_the_next_call_rebuilds(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "partial").write_text("x")
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        cached(KEY, broken, tmp_path)
    assert not (tmp_path / cache_key(KEY)).exists()
    assert not list(tmp_path.glob(".*.tmp-*"))
    entry = cached(KEY, _build_array, tmp_path)
    assert entry_problem(entry, cache_key(KEY)) is None and (entry / "data.npy").is_file()


def test_a_builder_killed_mid_build_leaves_nothing_complete_and_the_lock_free(
    tmp_path: Path,
) -> None:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_crash, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    entry = tmp_path / cache_key(KEY)
    leftovers = list(tmp_path.glob(f".{cache_key(KEY)}.tmp-*"))
    assert not entry.exists() and len(leftovers) == 1  # the dead builder's temp folder
    # The kernel released the dead process's lock: a new call gets it at once and rebuilds.
    entry = cached(KEY, _build_array, tmp_path, CacheSettings(wait_s=10))
    assert entry_problem(entry, cache_key(KEY)) is None and not (entry / "half-written.bin").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_an_entry_without_its_marker_is_rebuilt(tmp_path: Path) -> None:
    entry = cached(KEY, _build_array, tmp_path)
    (entry / COMPLETE_MARKER).unlink()
    (entry / "stale").write_text("x")
    assert cached(KEY, _build_array, tmp_path) == entry
    assert entry_problem(entry, cache_key(KEY)) is None and not (entry / "stale").exists()
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 2


def test_a_complete_entry_is_returned_without_building(tmp_path: Path) -> None:
    entry = cached(KEY, _build_array, tmp_path)

    def must_not_run(folder: Path) -> None:
        raise AssertionError("rebuilt a complete entry")

    assert cached(KEY, must_not_run, tmp_path) == entry


# ---- sharing: permissions, verification, temp folders of other builders, waiting -------------


def _snapshot_modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("umask", "mode", "folder", "file"), [
    (0o027, None, 0o750, 0o640),   # the umask decides...
    (0o002, None, 0o755, 0o644),   # ...but group/others never get write permission
    (0o077, 0o750, 0o750, 0o640),  # cluster.cache_mode overrides a private umask
])
def test_entries_get_the_umask_or_cache_mode_and_locks_are_usable_by_all(
    tmp_path: Path, umask: int, mode: int | None, folder: int, file: int
) -> None:
    old = os.umask(umask)
    try:
        entry = cached(KEY, _build_array, tmp_path / "cache", CacheSettings(mode=mode))
    finally:
        os.umask(old)
    modes = _snapshot_modes(entry)
    assert modes.pop(".") == folder
    assert set(modes) == {"data.npy", "key.json", COMPLETE_MARKER} and set(modes.values()) == {file}
    assert stat.S_IMODE((entry.parent / f"{entry.name}.lock").stat().st_mode) == 0o666
    root_mode = stat.S_IMODE((tmp_path / "cache").stat().st_mode)
    group_reads = folder & 0o040
    assert root_mode == (folder | stat.S_ISVTX | (0o020 | stat.S_ISGID if group_reads else 0))


@pytest.mark.parametrize("damage", ["grow a file", "edit key.json", "add a file", "symlink a file", "group-writable"])
def test_a_damaged_entry_of_ours_is_rebuilt(tmp_path: Path, damage: str) -> None:
    entry = cached(KEY, _build_array, tmp_path)
    data = entry / "data.npy"
    if damage == "grow a file":
        with data.open("ab") as f:
            f.write(b"\0")
    elif damage == "edit key.json":
        (entry / "key.json").write_text('{"kind": "test", "n": 1}')
    elif damage == "add a file":
        (entry / "planted.py").write_text("import os")
    elif damage == "symlink a file":
        data.unlink()
        data.symlink_to(tmp_path / "elsewhere.npy")
    else:
        data.chmod(0o664)
    assert entry_problem(entry, cache_key(KEY)) is not None
    assert cached(KEY, _build_array, tmp_path) == entry
    assert entry_problem(entry, cache_key(KEY)) is None and not (entry / "planted.py").exists()
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 2


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_temp_folders_of_dead_or_silent_builders_are_removed(tmp_path: Path) -> None:
    key, host = cache_key(KEY), socket.gethostname()
    temps = {
        "dead here": f".{key}.tmp-{host}-{_dead_pid()}-0a",
        "alive here": f".{key}.tmp-{host}-{os.getpid()}-0b",
        "fresh elsewhere": f".{key}.tmp-othernode-4242-0c",
        "silent elsewhere": f".{key}.tmp-othernode-4343-0d",
        "old format, silent": f".{key}.tmp-x8y9z0",
    }
    for name in temps.values():
        (tmp_path / name).mkdir()
    stale = time.time() - STALE_TMP_S - 60
    for what in ("silent elsewhere", "old format, silent"):
        os.utime(tmp_path / temps[what], (stale, stale))
    cached(KEY, _build_array, tmp_path)
    left = {what for what, name in temps.items() if (tmp_path / name).exists()}
    assert left == {"alive here", "fresh elsewhere"}


def _hold_build(root: str, seconds: float) -> None:
    cached(KEY, lambda folder: time.sleep(seconds), root)


def test_a_waiter_says_whom_it_waits_for_and_gives_up_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold_build, args=(str(tmp_path), 60))
    holder.start()
    try:
        key = cache_key(KEY)
        deadline = time.time() + 30
        while not list(tmp_path.glob(f".{key}.tmp-*")) and time.time() < deadline:
            time.sleep(0.1)
        caplog.set_level(logging.INFO, logger="hpcqwen.caching")
        start = time.monotonic()
        with pytest.raises(CacheError) as err:
            cached(KEY, _build_array, tmp_path, CacheSettings(wait_s=2, log_every_s=0.5))
        assert 2 <= time.monotonic() - start < 10  # gave up at its timeout, not after the holder's 60 s
    finally:
        holder.kill()
        holder.join()
    who = f"{socket.gethostname()}:{holder.pid}"
    assert f"gave up after 2 s waiting for {who} building cache entry {key}" in err.value.render()
    assert "hpcqwen prepare" in err.value.render() and "cluster.cache_wait_min" in err.value.render()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(lines) >= 4 and lines[0] == f"waiting for {who} building {key} (0 s)", lines
    assert lines[-1].endswith("(2 s)") or lines[-1].endswith("(1 s)")
    # the holder died (SIGKILL): the kernel freed its lock, the next call builds at once
    assert entry_problem(cached(KEY, _build_array, tmp_path, CacheSettings(wait_s=5)), key) is None


@pytest.mark.parametrize(("written", "message"), [
    ("0750", "write the mode quoted, e.g. cache_mode: '0750'"),  # YAML reads an unquoted 0750 as 488
    ("'0750'", None),
    ("'0775'", "must be an octal mode where the owner has rwx and group and others cannot write"),
    ("'rwx'", "must be an octal mode"),
])
def test_cache_mode_is_a_quoted_octal_mode_without_group_write(write_spec, written: str, message: str | None) -> None:
    from hpcqwen.errors import SpecError
    from hpcqwen.spec import load_spec

    spec = write_spec(f"name: x\ncluster: {{profile: local, cache_mode: {written}, cache_wait_min: 5}}\n"
                      "task: {kind: command, module: hpcqwen.examples.steps}\n")
    if message is None:
        assert CacheSettings.from_profile(load_spec(spec).cluster) == CacheSettings(mode=0o750, wait_s=300)
        return
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert [i.key for i in err.value.issues] == ["cluster.cache_mode"] and message in err.value.issues[0].message
