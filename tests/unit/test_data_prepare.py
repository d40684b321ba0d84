"""prepare_sft_dataset end to end: shipped data -> tokens -> packs -> shared cache -> memory map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen.data import DataError, prepare_sft_dataset
from hpcqwen.data.formats import load_dataset_rows
from hpcqwen.data.tokenize import IGNORE_INDEX, encode_rows, load_tokenizer


def _prepare(tmp_path: Path, tok_dir: Path, data_dir: Path, **kw: object):  # noqa: ANN202
    opts = dict(
        tokenizer_dir=tok_dir,
        base_dir=data_dir,
        cache_root=tmp_path / "cache",
        max_length=128,
        model_name="bot",
        model_author="lab",
    )
    return prepare_sft_dataset(["sft-tiny.jsonl", "self-cognition.jsonl#16"], **{**opts, **kw})


def test_packed_entry_is_built_once_and_memory_mapped(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    first = _prepare(tmp_path, tiny_tokenizer_dir, data_dir, packing=True)
    ds, stats = first.dataset, first.stats
    assert stats["num_rows"] == stats["num_kept"] == 80 and stats["num_truncated"] == 0
    assert set(ds.column_names) == {"input_ids", "labels", "position_ids", "seq_lens"}
    assert sum(sum(r) for r in ds["seq_lens"]) == stats["num_tokens"]
    assert stats["num_packs"] == len(ds) and 0.85 < stats["fill_ratio"] <= 1.0
    assert stats["fill_ratio"] == pytest.approx(stats["num_tokens"] / (len(ds) * 128))
    assert f"fill {stats['fill_ratio']:.1%}" in first.summary()
    assert all(
        Path(f["filename"]).is_relative_to(first.path) for f in ds.cache_files
    )  # Arrow memory map
    mtime = (first.path / "COMPLETE").stat().st_mtime_ns
    again = _prepare(tmp_path, tiny_tokenizer_dir, data_dir, packing=True)
    assert again.path == first.path and (again.path / "COMPLETE").stat().st_mtime_ns == mtime


def test_unpacked_entry_holds_the_encoded_examples(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    prepared = _prepare(tmp_path, tiny_tokenizer_dir, data_dir, loss_scale="ignore_empty_think")
    rows = load_dataset_rows(
        ["sft-tiny.jsonl", "self-cognition.jsonl#16"],
        base_dir=data_dir,
        seed=42,
        model_name="bot",
        model_author="lab",
    )
    expected, _ = encode_rows(
        load_tokenizer(tiny_tokenizer_dir), rows, max_length=128, loss_scale="ignore_empty_think"
    )
    assert prepared.dataset["input_ids"] == [e["input_ids"] for e in expected]
    assert prepared.dataset["labels"] == [e["labels"] for e in expected]
    packed = _prepare(
        tmp_path, tiny_tokenizer_dir, data_dir, loss_scale="ignore_empty_think", packing=True
    )
    assert packed.path != prepared.path
    assert sum(lab != IGNORE_INDEX for r in packed.dataset["labels"] for lab in r) == sum(
        lab != IGNORE_INDEX for e in expected for lab in e["labels"]
    )


def test_data_errors_surface_from_the_build_and_leave_no_entry(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    with pytest.raises(DataError, match="`model_name` is not set"):
        _prepare(tmp_path, tiny_tokenizer_dir, data_dir, model_name=None)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


@pytest.mark.parametrize(
    ("strategy", "said"),
    [("delete", "truncation_strategy delete: 3 rows over max_length 48 dropped"),
     ("left", "truncation_strategy left: 3 rows over max_length 48 cut at the head"),
     ("right", "truncation_strategy right: 3 rows over max_length 48 cut at the tail")],
)
def test_truncation_strategy_is_reported_and_keys_the_cache(
    tmp_path: Path, tiny_tokenizer_dir: Path, strategy: str, said: str
) -> None:
    short = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}]}
             for i in range(5)]
    long = [{"messages": [{"role": "user", "content": "why " * 40}, {"role": "assistant", "content": "no"}]}] * 3
    (tmp_path / "mix.jsonl").write_text("\n".join(json.dumps(r) for r in short + long) + "\n")
    opts = dict(tokenizer_dir=tiny_tokenizer_dir, base_dir=tmp_path, cache_root=tmp_path / "cache", max_length=48)
    prepared = prepare_sft_dataset(["mix.jsonl"], truncation_strategy=strategy, **opts)
    assert said in prepared.summary()
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert stats["truncation_strategy"] == strategy
    assert (stats["num_deleted"], stats["num_truncated"]) == ((3, 0) if strategy == "delete" else (0, 3))
    assert stats["num_kept"] == (8 if strategy == "left" else 5)  # right: the answers were cut away
    assert stats["num_no_loss"] == (3 if strategy == "right" else 0)
    assert all(len(ids) <= 48 for ids in prepared.dataset["input_ids"])
    others = {prepare_sft_dataset(["mix.jsonl"], truncation_strategy=s, **opts).path
              for s in ("delete", "left", "right")}
    assert len(others) == 3 and prepared.path in others
    last_round = prepare_sft_dataset(["mix.jsonl"], truncation_strategy=strategy, multi_turn="last_round", **opts)
    assert last_round.path not in others


def test_no_example_left_names_the_strategy(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    row = {"messages": [{"role": "user", "content": "why " * 40}, {"role": "assistant", "content": "no"}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="truncation_strategy delete: 1 rows over max_length 32 dropped") as err:
        prepare_sft_dataset(["long.jsonl"], tokenizer_dir=tiny_tokenizer_dir, base_dir=tmp_path,
                            cache_root=tmp_path / "cache", max_length=32)
    assert "truncation_strategy: left or right" in err.value.hint


def test_a_split_for_evaluation_never_writes_to_the_cache_entry(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    from helpers import immutable, tree_snapshot

    from hpcqwen.data import split_eval

    prepared = _prepare(tmp_path, tiny_tokenizer_dir, data_dir)
    before = tree_snapshot(prepared.path)
    with immutable(prepared.path):  # as another user's entry would be
        train, evaluation = split_eval(prepared.dataset, 0.25, seed=42)
        assert (len(train), len(evaluation)) == (60, 20)
        assert sorted([*train["input_ids"], *evaluation["input_ids"]]) == sorted(prepared.dataset["input_ids"])
    assert tree_snapshot(prepared.path) == before
