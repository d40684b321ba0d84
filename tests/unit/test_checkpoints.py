"""Checkpoint completion markers, newest-complete resolution and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen import checkpoints


def make(root: Path, step: int, complete: bool) -> Path:
    path = checkpoints.checkpoint_dir(root, step)
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x" * 10)
    if complete:
        checkpoints.mark_complete(path, {"note": "test"})
    return path


def test_marker_is_written_last_with_the_step(tmp_path: Path) -> None:
    path = make(tmp_path, 40, complete=True)
    marker = json.loads((path / checkpoints.MARKER).read_text())
    assert marker["step"] == 40 and marker["note"] == "test"
    assert not list(path.glob(".*.tmp"))


def test_latest_complete_skips_an_interrupted_save(tmp_path: Path) -> None:
    assert checkpoints.latest_complete(tmp_path / "missing") is None
    make(tmp_path, 5, True)
    make(tmp_path, 10, True)
    make(tmp_path, 15, False)  # the node died while saving
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-10"
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10",
                                                                       "checkpoint-15"]


def test_prune_keeps_the_newest_complete_and_a_save_in_progress(tmp_path: Path) -> None:
    for step, complete in ((5, True), (8, False), (10, True), (15, True), (20, False)):
        make(tmp_path, step, complete)
    gone = checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["checkpoint-5", "checkpoint-8"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-15",
                                                                       "checkpoint-20"]
    checkpoints.prune(tmp_path, keep=1)
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-15"
    assert (tmp_path / "checkpoint-20").is_dir()  # newer but incomplete: maybe still being written


def test_prune_without_a_complete_checkpoint_deletes_nothing(tmp_path: Path) -> None:
    make(tmp_path, 3, False)
    assert checkpoints.prune(tmp_path, keep=1) == [] and (tmp_path / "checkpoint-3").is_dir()


def test_a_complete_megatron_checkpoint_is_never_overwritten(tmp_path: Path) -> None:
    """Another run's (or an earlier attempt's) complete iter_N stays as it is; save() writes nothing."""
    pytest.importorskip("megatron.core")
    from hpcqwen.megatron import checkpoint

    done = checkpoint.iter_dir(tmp_path, 5)
    done.mkdir()
    (done / "common.pt").write_bytes(b"theirs")
    checkpoints.mark_complete(done)
    assert checkpoint.save(tmp_path, 5, model=None, optimizer=None, scheduler=None, meta={}, hf_dir=tmp_path) is None
    assert (done / "common.pt").read_bytes() == b"theirs" and checkpoints.is_complete(done)


def test_prune_by_iteration_names(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from hpcqwen.megatron import checkpoint

    for it in (1, 2, 3):
        checkpoint.iter_dir(tmp_path, it).mkdir()
    for it in (2, 3):
        checkpoints.mark_complete(checkpoint.iter_dir(tmp_path, it))
    checkpoint.iter_dir(tmp_path, 4).mkdir()  # a save under way: newer than the newest complete one
    assert [p.name for p in checkpoint.prune(tmp_path, 1)] == ["iter_0000001", "iter_0000002"]
    # saves.jsonl (one line per save, for `hpcqwen cost`) is no checkpoint: pruning leaves it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "saves.jsonl"]
    assert len((tmp_path / "saves.jsonl").read_text().splitlines()) == 2
    assert checkpoint.latest_complete(tmp_path) == checkpoint.iter_dir(tmp_path, 3)
