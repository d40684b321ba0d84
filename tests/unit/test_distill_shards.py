"""Shard files on disk: the prompt split, atomic appends, torn-line repair, done markers and the merge."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from hpcqwen.data.formats import load_dataset_rows
from hpcqwen.shards import (
    ShardFile,
    ShardsIncomplete,
    array_indices,
    done_file,
    incomplete_shards,
    mark_done,
    merge_shards,
    shard_file,
    shard_ids,
    shards_of_task,
)

PREFIX = "<think>\n\n</think>\n\n"


def record(i: int, n: int = 2) -> dict:
    return {"id": i, "messages": [{"role": "user", "content": f"q{i}"}], "assistant_prefix": PREFIX,
            "prompt_tokens": 5, "completions": [{"text": f"a{i}.{j}", "completion_tokens": 3,
                                                 "finish_reason": "stop"} for j in range(n)]}


@pytest.mark.parametrize(("n", "k"), [(10, 3), (3, 3), (1000, 7), (5, 1), (10000, 1001)])
def test_shards_split_the_prompts_exactly_once(n: int, k: int) -> None:
    ids = [i for s in range(k) for i in shard_ids(n, k, s)]
    assert ids == list(range(n))
    sizes = [len(shard_ids(n, k, s)) for s in range(k)]
    assert max(sizes) - min(sizes) <= 1


def test_array_tasks_cover_every_shard_once() -> None:
    for size, shards in [(3, 3), (3, 7), (1001, 2500), (1, 4)]:
        owned = sorted(s for i in range(size) for s in shards_of_task(i, size, shards))
        assert owned == list(range(shards))
    assert shards_of_task(None, 1, 1) == [0]
    assert array_indices([1, 5], 4) == [1]


def test_append_read_and_line_count(tmp_path: Path) -> None:
    sf = ShardFile(shard_file(tmp_path, 0))
    assert sf.append([record(0), record(1)]) == 2
    assert sf.append([record(2)]) == 3
    assert sorted(sf.read()) == [0, 1, 2]
    other = ShardFile(shard_file(tmp_path, 0))  # another engine's view counts from scratch
    assert other.count_lines() == 3


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    sf = ShardFile(shard_file(tmp_path, 1))
    sf.append([record(0), record(1)])
    good = sf.path.read_bytes()
    with open(sf.path, "ab") as f:
        f.write(b'{"id": 2, "messages": [{"ro')  # a writer killed mid-line
    assert sorted(sf.read()) == [0, 1]  # readers skip it
    assert sf.append([record(2)]) == 3
    assert sf.path.read_bytes() == good + (json.dumps(record(2)) + "\n").encode()
    with open(sf.path, "ab") as f:
        f.write(b"\0\0\0\0\n")  # a complete-looking line of garbage (a crash after the size grew)
    with sf.lock:
        assert sf.repair() == 5
    assert sorted(sf.read()) == [0, 1, 2]


def test_a_torn_line_longer_than_the_tail_block_is_still_found(tmp_path: Path) -> None:
    sf = ShardFile(shard_file(tmp_path, 0))
    sf.append([record(0)])
    torn = b'{"id": 1, "messages": "' + b"x" * 300_000
    with open(sf.path, "ab") as f:
        f.write(torn)
    with sf.lock:
        assert sf.repair() == len(torn)
    assert sorted(sf.read()) == [0]


def _append_many(path: str, start: int) -> None:
    sf = ShardFile(Path(path))
    for i in range(start, start + 40, 2):
        sf.append([record(i)])


def test_concurrent_engines_never_interleave_lines(tmp_path: Path) -> None:
    path = shard_file(tmp_path, 0)
    ShardFile(path)  # creates the folder
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), s)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = path.read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == list(range(40))


def test_done_only_when_every_id_is_there_and_merge_is_idempotent(tmp_path: Path) -> None:
    n, k = 7, 3
    for s in range(k):
        ShardFile(shard_file(tmp_path, s)).append([record(i) for i in shard_ids(n, k, s) if i != 5])
    assert [mark_done(tmp_path, s, shard_ids(n, k, s)) for s in range(k)] == [True, True, False]
    assert incomplete_shards(tmp_path, k) == [2]
    with pytest.raises(ShardsIncomplete) as info:
        merge_shards(tmp_path, k, 2, tmp_path / "out.jsonl")
    assert info.value.render() == (
        f"error[distill]: 1 of 3 shards are not complete (shard 2: 2 written)\n  where: {tmp_path}/shards\n"
        f"  hint: resubmit them: hpcqwen merge {tmp_path} --resubmit")
    assert not (tmp_path / "out.jsonl").exists()
    ShardFile(shard_file(tmp_path, 2)).append([record(5)])
    assert mark_done(tmp_path, 2, shard_ids(n, k, 2))
    assert json.loads(done_file(tmp_path, 2).read_text()) == {"shard": 2, "first_id": 4, "stop_id": 7, "prompts": 3}
    result = merge_shards(tmp_path, k, 2, tmp_path / "out.jsonl")
    first = result.path.read_bytes()
    assert (result.rows, result.prompts, result.skipped) == (14, 7, 0)
    assert merge_shards(tmp_path, k, 2, tmp_path / "out.jsonl").path.read_bytes() == first  # same bytes again
    rows = load_dataset_rows([str(result.path)], base_dir="/", seed=0)
    assert [(r["id"], r["sample"]) for r in rows] == [(i, j) for i in range(7) for j in range(2)]
    assert rows[0]["messages"] == [{"role": "user", "content": "q0"},
                                   {"role": "assistant", "content": PREFIX + "a0.0"}]


def test_merge_refuses_a_done_shard_that_lost_ids_and_skips_too_long_prompts(tmp_path: Path) -> None:
    too_long = {**record(1), "completions": [], "skipped": "prompt of 9000 tokens does not fit max_model_len 8192"}
    ShardFile(shard_file(tmp_path, 0)).append([record(0), too_long])
    assert mark_done(tmp_path, 0, range(0, 2))
    result = merge_shards(tmp_path, 1, 2, tmp_path / "out.jsonl")
    assert (result.rows, result.prompts, result.skipped) == (2, 2, 1)
    shard_file(tmp_path, 0).write_text(json.dumps(record(0)) + "\n")
    with pytest.raises(ShardsIncomplete, match="shard 0 is marked done but its file holds 1 of 2 ids"):
        merge_shards(tmp_path, 1, 2, tmp_path / "out.jsonl")
