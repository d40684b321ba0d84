"""Dataset references, row formats, self-cognition names and `#N` sampling, on real files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from hpcqwen.data.formats import DataError, DatasetRef, load_dataset_rows, parse_dataset_ref
from hpcqwen.testing import write_jsonl


def _msgs(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("a.jsonl", DatasetRef("a.jsonl")),
        ("a.jsonl#5", DatasetRef("a.jsonl", None, 5)),
        ("data/dir:sub#3", DatasetRef("data/dir", "sub", 3)),
        ("swift/self-cognition:qwen3#600", DatasetRef("swift/self-cognition", "qwen3", 600)),
        ("/abs/x.parquet", DatasetRef("/abs/x.parquet")),
    ],
)
def test_parse_dataset_ref(ref: str, expected: DatasetRef) -> None:
    assert parse_dataset_ref(ref) == expected


@pytest.mark.parametrize("bad", ["a.jsonl#x", "a.jsonl#0", "a.jsonl#-3", "a.jsonl#", "a.jsonl#2.5"])
def test_parse_dataset_ref_rejects_a_count_that_is_not_a_positive_integer(bad: str) -> None:
    with pytest.raises(ValueError, match="must be a positive integer, got"):
        parse_dataset_ref(bad)


def test_messages_and_query_response_formats(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": _msgs("q1", "a1"), "system": "sys-col", "solution": "42"},
            {"messages": [{"role": "system", "content": "own"}, *_msgs("q2", "a2")]},
        ],
    )
    write_jsonl(
        tmp_path / "qr.jsonl",
        [
            {"query": "q3", "response": "a3", "system": "s3"},
            {"query": "q4", "response": "a4", "history": [["h-q", "h-a"]]},
        ],
    )
    rows = load_dataset_rows(["m.jsonl", "qr.jsonl"], base_dir=tmp_path, seed=0, system="default")
    assert [r["messages"] for r in rows] == [
        [{"role": "system", "content": "sys-col"}, *_msgs("q1", "a1")],
        [{"role": "system", "content": "own"}, *_msgs("q2", "a2")],
        [{"role": "system", "content": "s3"}, *_msgs("q3", "a3")],
        [{"role": "system", "content": "default"}, *_msgs("h-q", "h-a"), *_msgs("q4", "a4")],
    ]
    assert rows[0]["solution"] == "42"  # extra columns are kept for GRPO


def test_csv_parquet_json_and_folders(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    with (folder / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["query", "response"])
        w.writeheader()
        w.writerow({"query": "csv-q", "response": "csv-a"})
    with (folder / "b.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["messages"])
        w.writeheader()
        w.writerow({"messages": json.dumps(_msgs("csvm-q", "csvm-a"))})
    pq.write_table(
        pa.Table.from_pylist([{"messages": _msgs("pq-q", "pq-a")}]), folder / "c.parquet"
    )
    (folder / "d.json").write_text(json.dumps([{"query": "json-q", "response": "json-a"}]))
    rows = load_dataset_rows(["mixed"], base_dir=tmp_path, seed=0)
    assert [r["messages"][0]["content"] for r in rows] == ["csv-q", "csvm-q", "pq-q", "json-q"]


def test_self_cognition_names_are_filled_by_language(data_dir: Path) -> None:
    rows = load_dataset_rows(
        ["self-cognition.jsonl"],
        base_dir=data_dir,
        seed=0,
        model_name=["小黄", "Xiao Huang"],
        model_author=["魔搭", "ModelScope"],
    )
    assert len(rows) == 40
    text = json.dumps(rows, ensure_ascii=False)
    assert "{{" not in text and "tag" not in rows[0]
    by_question = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert by_question["你叫什么名字？"] == "我的名字是小黄，由魔搭开发。"
    assert (
        by_question["What is your name?"]
        == "My name is Xiao Huang, and I was developed by ModelScope."
    )


def test_self_cognition_single_name_serves_both_languages(data_dir: Path) -> None:
    rows = load_dataset_rows(
        ["self-cognition.jsonl#4"],
        base_dir=data_dir,
        seed=1,
        model_name="swift-robot",
        model_author="swift",
    )
    assert all("swift" in r["messages"][1]["content"] for r in rows)


@pytest.mark.parametrize("missing", ["model_name", "model_author"])
def test_self_cognition_without_names_fails_naming_file_and_row(
    data_dir: Path, missing: str
) -> None:
    names = {"model_name": "bot", "model_author": "lab"}
    names[missing] = None  # type: ignore[assignment]
    with pytest.raises(DataError) as err:
        load_dataset_rows(["self-cognition.jsonl"], base_dir=data_dir, seed=0, **names)
    assert err.value.file.endswith("self-cognition.jsonl") and err.value.row == 1
    assert f"`{missing}` is not set" in str(err.value)


def _numbered(tmp_path: Path, n: int, name: str = "n.jsonl") -> str:
    write_jsonl(tmp_path / name, [{"query": f"q{i}", "response": f"a{i}"} for i in range(n)])
    return name


def _queries(rows: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in rows]


def test_sampling_is_seeded_and_deterministic(tmp_path: Path) -> None:
    name = _numbered(tmp_path, 50)
    first = _queries(load_dataset_rows([f"{name}#10"], base_dir=tmp_path, seed=7))
    again = _queries(load_dataset_rows([f"{name}#10"], base_dir=tmp_path, seed=7))
    other = _queries(load_dataset_rows([f"{name}#10"], base_dir=tmp_path, seed=8))
    assert first == again and first != other
    assert len(first) == len(set(first)) == 10


def test_sampling_more_than_the_data_repeats_it_then_samples_the_rest(tmp_path: Path) -> None:
    name = _numbered(tmp_path, 40)
    counts = Counter(_queries(load_dataset_rows([f"{name}#100"], base_dir=tmp_path, seed=0)))
    assert sum(counts.values()) == 100 and len(counts) == 40
    assert sorted(Counter(counts.values()).items()) == [(2, 20), (3, 20)]


def test_mixing_datasets_with_per_dataset_counts(tmp_path: Path, data_dir: Path) -> None:
    name = _numbered(tmp_path, 30)
    rows = load_dataset_rows(
        [f"{name}#5", str(data_dir / "self-cognition.jsonl#7")],
        base_dir=tmp_path,
        seed=0,
        model_name="bot",
        model_author="lab",
    )
    assert len(rows) == 12
    assert all(q.startswith("q") for q in _queries(rows[:5]))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"prompt": "x", "completion": "y"},
            "columns ['completion', 'prompt'] match no known format",
        ),
        ({"text": "only text"}, "columns ['text'] match no known format"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] needs a role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": []}, "`messages` must be a non-empty list"),
        ({"query": "q", "response": "r", "history": ["not a pair"]}, "`history` must hold"),
    ],
)
def test_bad_rows_name_file_row_and_expected_columns(
    tmp_path: Path, line: dict, message: str
) -> None:
    write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": "r"}] * 2 + [line])
    with pytest.raises(DataError) as err:
        load_dataset_rows(["bad.jsonl"], base_dir=tmp_path, seed=0)
    assert (err.value.file, err.value.row) == (str(tmp_path / "bad.jsonl"), 3)
    assert message in err.value.message
    assert str(err.value).startswith(f"{tmp_path / 'bad.jsonl'}: row 3: ")
    if "no known format" in message:
        assert (
            "expected `messages`" in err.value.message
            and "`query` (+ `response`" in err.value.message and "alpaca `instruction`" in err.value.message
        )


def test_invalid_json_line_names_the_row(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"query": "q", "response": "r"}\n{"query": \n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        load_dataset_rows(["broken.jsonl"], base_dir=tmp_path, seed=0)
    assert err.value.row == 2


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the dataset has no rows"):
        load_dataset_rows(["empty.jsonl#3"], base_dir=tmp_path, seed=0)


def test_missing_path_and_hub_ids_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset_rows(["nope.jsonl"], base_dir=tmp_path, seed=0)
    for hub_id in ["swift/self-cognition#500", "swift/self-cognition:qwen3#600"]:
        with pytest.raises(DataError, match="not a local path.*offline") as err:
            load_dataset_rows([hub_id], base_dir=tmp_path, seed=0)
        assert "huggingface-cli download" in err.value.hint
    (tmp_path / "one.jsonl").write_text('{"query": "q", "response": "r"}\n')
    with pytest.raises(DataError, match="subset 'x' given for a file"):
        load_dataset_rows(["one.jsonl:x"], base_dir=tmp_path, seed=0)


def test_a_local_folder_wins_over_a_hub_id_and_subset_picks_a_subfolder(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "org" / "corpus" / "qwen3" / "x.jsonl", [{"query": "q", "response": "r"}])
    write_jsonl(tmp_path / "org" / "corpus" / "other" / "y.jsonl", [{"query": "o", "response": "r"}])
    rows = load_dataset_rows(["org/corpus:qwen3"], base_dir=tmp_path, seed=0)
    assert _queries(rows) == ["q"]


SC_NAMES = {"model_name": ["小Q", "Little-Q"], "model_author": ["实验室", "the lab"]}


@pytest.mark.parametrize(
    ("subset", "suffix", "prefix"),
    [(None, "", ""), ("default", "", ""), ("qwen3", " /no_think", "<think>\n\n</think>\n\n"),
     ("empty_think", "", "<think>\n\n</think>\n\n")],
)
def test_self_cognition_subsets_mean_what_ms_swift_means(
    data_dir: Path, tmp_path: Path, subset: str | None, suffix: str, prefix: str
) -> None:
    plain = load_dataset_rows(["self-cognition.jsonl"], base_dir=data_dir, seed=0, **SC_NAMES)
    ref = "self-cognition.jsonl" + (f":{subset}" if subset else "")
    rows = load_dataset_rows([ref], base_dir=data_dir, seed=0, **SC_NAMES)
    assert len(rows) == len(plain) == 40
    for row, base in zip(rows, plain, strict=True):
        (user, answer), (base_user, base_answer) = row["messages"], base["messages"]
        assert user == {"role": "user", "content": base_user["content"] + suffix}
        assert answer == {"role": "assistant", "content": prefix + base_answer["content"]}
    assert "Little-Q" in rows[-1]["messages"][1]["content"]  # names are filled as before
    # A local copy of the hub dataset (a folder named self-cognition) behaves the same, with #N.
    copy = tmp_path / "swift" / "self-cognition"
    copy.mkdir(parents=True)
    (copy / "self_cognition.jsonl").write_text((data_dir / "self-cognition.jsonl").read_text())
    sampled = load_dataset_rows([f"{copy}:{subset or 'default'}#7"], base_dir=tmp_path, seed=0, **SC_NAMES)
    assert len(sampled) == 7 and all(r["messages"][0]["content"].endswith(suffix) for r in sampled)
    assert all(r["messages"][1]["content"].startswith(prefix) for r in sampled)


def test_unknown_self_cognition_subset_is_a_data_error(data_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown subset 'qwen4' of the self-cognition dataset") as err:
        load_dataset_rows(["self-cognition.jsonl:qwen4"], base_dir=data_dir, seed=0, **SC_NAMES)
    assert "default, qwen3, empty_think" in err.value.hint


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("{data}/self-cognition.jsonl:qwen3#10", None),
        ("{data}/self-cognition.jsonl:qwen4#10", "unknown subset 'qwen4' of the self-cognition dataset"),
        ("swift/self-cognition:qwen3#600", None),
        ("swift/self-cognition:thinking#600", "unknown subset 'thinking' of the self-cognition dataset"),
        ("{tmp}/self_cognition:empty_think", None),
        ("{data}/sft-tiny.jsonl:qwen3", "subset 'qwen3' given for the file"),
        ("{tmp}/corpus:missing", "no subfolder 'missing' in the dataset folder"),
        ("{tmp}/corpus:part", None),
        ("org/corpus:anything", None),  # a hub dataset's subsets are its own
    ],
)
def test_subsets_are_checked_on_the_login_node(data_dir: Path, tmp_path: Path, ref: str, message: str | None) -> None:
    from hpcqwen.data.formats import subset_error

    (tmp_path / "corpus" / "part").mkdir(parents=True)
    (tmp_path / "self_cognition").mkdir()
    error = subset_error(ref.format(data=data_dir, tmp=tmp_path))
    assert (error is None) if message is None else (error is not None and message in error[0])


def test_alpaca_and_prompt_only_rows(tmp_path: Path) -> None:
    from hpcqwen.data.formats import normalize_row

    alpaca = normalize_row({"instruction": "Translate", "input": "bonjour", "output": "hello", "id": 7}, "a", 1)
    assert alpaca == {"messages": [{"role": "user", "content": "Translate\nbonjour"},
                                   {"role": "assistant", "content": "hello"}], "id": 7}
    no_input = normalize_row({"instruction": "Say hi", "input": "", "output": "hi"}, "a", 2)
    assert no_input["messages"][0] == {"role": "user", "content": "Say hi"}
    prompt = normalize_row({"query": "2+2?", "solution": "4"}, "a", 3)
    assert prompt == {"messages": [{"role": "user", "content": "2+2?"}], "solution": "4"}
