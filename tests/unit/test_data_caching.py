"""The shared cache under real processes and a real file lock: one build, crashes leave nothing."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from hpcqwen.caching import COMPLETE_MARKER, cache_key, cached, dataset_key_parts, is_complete

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
    assert is_complete(entry) and (entry / "data.npy").is_file()


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
    entry = cached(KEY, _build_array, tmp_path, timeout_s=10)
    assert is_complete(entry) and not (entry / "half-written.bin").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_an_entry_without_its_marker_is_rebuilt(tmp_path: Path) -> None:
    entry = cached(KEY, _build_array, tmp_path)
    (entry / COMPLETE_MARKER).unlink()
    (entry / "stale").write_text("x")
    assert cached(KEY, _build_array, tmp_path) == entry
    assert is_complete(entry) and not (entry / "stale").exists()
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 2


def test_a_complete_entry_is_returned_without_building(tmp_path: Path) -> None:
    entry = cached(KEY, _build_array, tmp_path)

    def must_not_run(folder: Path) -> None:
        raise AssertionError("rebuilt a complete entry")

    assert cached(KEY, must_not_run, tmp_path) == entry


def test_dataset_key_follows_content_not_paths(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_text("weights do not matter")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("same\n")
    b.write_text("same\n")
    opts = dict(
        tokenizer_dir=tok,
        chat_template="T",
        max_length=8,
        loss_scale="default",
        packing=True,
        enable_thinking=None,
        seed=0,
    )

    def key(files: list[Path], **changes: object) -> str:
        return cache_key(dataset_key_parts(["d.jsonl"], data_files=files, **{**opts, **changes}))

    base = key([a])
    assert key([b]) == base  # same bytes elsewhere: same entry
    (tok / "model.safetensors").write_text("other weights")
    assert key([a]) == base
    for change in [
        dict(max_length=9),
        dict(loss_scale="ignore_empty_think"),
        dict(packing=False),
        dict(enable_thinking=False),
        dict(seed=1),
        dict(chat_template="U"),
    ]:
        assert key([a], **change) != base, change
    b.write_text("edited\n")
    assert key([b]) != base
    (tok / "tokenizer.json").write_text('{"x": 1}')
    assert key([a]) != base
