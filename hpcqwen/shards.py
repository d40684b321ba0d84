"""Distillation shards on the shared filesystem: who owns which prompts, append-only shard files,
completion markers, and the merge into one SFT dataset.

`RUN_DIR/shards/shard-<i>.jsonl` holds one JSON line per prompt id of shard i (all its answers).
Lines are appended in whole batches under a lock file (flock, which Linux emulates with POSIX locks
on NFS), then flushed and fsync'ed, so a line is either complete or is the torn tail of a writer
that died; the next writer cuts such a tail before appending. `shard-<i>.done` is written (tmp +
rename) only when every id of the shard is in the file. The merge reads complete shards only, in
id order, so it writes the same bytes every time it runs (idempotent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from hpcqwen.errors import HpcqwenError
from hpcqwen.fs import write_atomic

SHARDS = "shards"
Record = dict[str, Any]


def shard_dir(run_dir: str | Path) -> Path:
    """`RUN_DIR/shards`."""
    return Path(run_dir) / SHARDS


def shard_file(run_dir: str | Path, shard: int) -> Path:
    """`RUN_DIR/shards/shard-<i>.jsonl`."""
    return shard_dir(run_dir) / f"shard-{shard}.jsonl"


def done_file(run_dir: str | Path, shard: int) -> Path:
    """`RUN_DIR/shards/shard-<i>.done`: written once every id of the shard is in its file."""
    return shard_dir(run_dir) / f"shard-{shard}.done"


def shard_ids(n_prompts: int, n_shards: int, shard: int) -> range:
    """The prompt ids (positions in the loaded prompt list) that shard `shard` owns: a contiguous block."""
    return range(shard * n_prompts // n_shards, (shard + 1) * n_prompts // n_shards)


def shards_of_task(array_index: int | None, array_size: int, n_shards: int) -> list[int]:
    """The shards one array task runs: its own index, plus every `array_size`-th one above it when there
    are more shards than array tasks (MaxArraySize)."""
    return list(range(array_index or 0, n_shards, max(array_size, 1)))


def array_indices(shards: Iterable[int], array_size: int) -> list[int]:
    """The array tasks that own `shards` (to resubmit exactly those)."""
    return sorted({s % max(array_size, 1) for s in shards})


class ShardFile:
    """One shard's JSON-lines file, shared by the engines of a task and by restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = FileLock(str(path) + ".lock")
        self._counted = (0, 0)  # (bytes, complete lines) counted so far
        path.parent.mkdir(parents=True, exist_ok=True)

    def repair(self) -> int:
        """Cut a torn last line (no newline, or not JSON); returns the bytes removed. Call under the lock."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            start, tail = _tail(f, size)
            keep = len(tail) if tail.endswith(b"\n") else tail.rfind(b"\n") + 1
            last = tail[tail.rfind(b"\n", 0, max(keep - 1, 0)) + 1:keep]
            if last and not _is_json(last):  # a complete-looking line of garbage (e.g. zeros after a crash)
                keep -= len(last)
            if start + keep < size:
                f.truncate(start + keep)
                f.flush()
                os.fsync(f.fileno())
            return size - start - keep

    def read(self) -> dict[int, Record]:
        """Every complete record by id (the first of any repeat), skipping a torn tail."""
        out: dict[int, Record] = {}
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            for line in f:
                if line.endswith(b"\n") and _is_json(line):
                    record = json.loads(line)
                    out.setdefault(int(record["id"]), record)
        return out

    def append(self, records: list[Record]) -> int:
        """Append whole lines in one write, then flush and fsync, under the lock; returns the file's line
        count afterwards (counted incrementally: only bytes added since the last call are read)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with self.lock:
            self.repair()
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self.count_lines()

    def count_lines(self) -> int:
        """Complete lines in the file (other engines append too); reads only what is new since last time."""
        if not self.path.exists():
            return 0
        offset, lines = self._counted
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:  # cut by repair(): count again
                offset, lines = 0, 0
            f.seek(offset)
            data = f.read(size - offset)
        end = data.rfind(b"\n") + 1
        self._counted = (offset + end, lines + data.count(b"\n"))
        return self._counted[1]


def _tail(f: Any, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of the file's end, long enough to hold its last two newlines (or the whole file)."""
    block = 1 << 16
    while True:
        start = max(0, size - block)
        f.seek(start)
        data: bytes = f.read(size - start)
        if start == 0 or data.count(b"\n") >= 2:
            return start, data
        block *= 4


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def mark_done(run_dir: str | Path, shard: int, ids: range) -> bool:
    """Write the shard's done marker if every id is in its file; True when the shard is complete."""
    marker = done_file(run_dir, shard)
    if marker.exists():
        return True
    sf = ShardFile(shard_file(run_dir, shard))
    with sf.lock:
        present = set(sf.read())
        if not set(ids) <= present:
            return False
        info = {"shard": shard, "first_id": ids.start, "stop_id": ids.stop, "prompts": len(ids)}
        write_atomic(marker, json.dumps(info) + "\n")
    return True


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    path: Path
    rows: int
    prompts: int
    skipped: int


class DistillError(HpcqwenError):
    """A distill run's shards cannot be used as they are."""

    reference = "distill"


class ShardsIncomplete(DistillError):
    """The merge needs every shard's done marker."""


def incomplete_shards(run_dir: str | Path, n_shards: int) -> list[int]:
    """Shards without a done marker."""
    return [i for i in range(n_shards) if not done_file(run_dir, i).exists()]


def merge_shards(run_dir: str | Path, n_shards: int, n_return: int, result: Path) -> MergeResult:
    """Write `result` in the messages format from every complete shard (tmp + rename, under a lock).

    Raises:
        ShardsIncomplete: some shard has no done marker, or its file lost ids.
    """
    missing = incomplete_shards(run_dir, n_shards)
    if missing:
        counts = ", ".join(f"shard {i}: {len(ShardFile(shard_file(run_dir, i)).read())} written" for i in missing)
        raise ShardsIncomplete(f"{len(missing)} of {n_shards} shards are not complete ({counts})",
                               where=str(shard_dir(run_dir)),
                               hint=f"resubmit them: hpcqwen merge {run_dir} --resubmit")
    lines, prompts, skipped = [], 0, 0
    for i in range(n_shards):
        marker = json.loads(done_file(run_dir, i).read_text())
        records = ShardFile(shard_file(run_dir, i)).read()
        ids = range(marker["first_id"], marker["stop_id"])
        if set(records) != set(ids):
            raise ShardsIncomplete(f"shard {i} is marked done but its file holds {len(records)} of {len(ids)} ids",
                                   where=str(shard_file(run_dir, i)), hint="delete its .done marker and resubmit")
        for pid in ids:
            rows = sft_rows(records[pid], n_return)
            skipped += not rows
            prompts += 1
            lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    result.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shard_dir(run_dir) / "merge.lock")):
        write_atomic(result, "".join(lines))
    return MergeResult(result, len(lines), prompts, skipped)


def sft_rows(record: Record, n_return: int) -> list[Record]:
    """One `messages` row per answer: the prompt turns plus `assistant_prefix` + the answer (the model's
    reasoning stays inside its <think>...</think>)."""
    if record.get("skipped"):
        return []
    answers = record["completions"]
    if len(answers) != n_return:
        raise DistillError(f"prompt {record['id']} has {len(answers)} answers, expected {n_return}")
    prefix = record.get("assistant_prefix", "")
    return [{"messages": [*record["messages"], {"role": "assistant", "content": prefix + a["text"]}],
             "id": record["id"], "sample": j} for j, a in enumerate(answers)]
