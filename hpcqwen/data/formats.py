"""Dataset references and row formats: local files in, `{"messages": [...]}` rows out.

A reference is `path[:subset][#N]`, as in ms-swift's `--dataset`. Files are JSON, JSON Lines,
CSV or Parquet (or a directory of them). A subset selects a subfolder of a dataset folder, except
for the self-cognition dataset (a path whose last part is `self-cognition` or `self_cognition`,
with or without a file suffix: `swift/self-cognition`, a local copy, the project's
`jobspecs/data/self-cognition.jsonl`), whose subsets are ms-swift's: `default`, `qwen3` (each
query ends in ` /no_think`, each answer starts with an empty think block) and `empty_think` (the
answers only). Rows are either `messages` (optional `system` column)
or `query`/`response` (optional `system`, `history`); any other column is kept (GRPO reads
`solution`). A hub id (`org/name`) is downloaded into the Hugging Face cache when the hub is
reachable and HF_HUB_OFFLINE is unset (point HF_HOME at the shared filesystem); offline, it is
refused with a hint to download it first. The cache key hashes the downloaded files' content.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen.errors import HpcqwenError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
PLACEHOLDERS = {"{{NAME}}": "model_name", "{{AUTHOR}}": "model_author"}
EXPECTED = (
    "`messages` (a list of {role, content}; optional `system` column), `query` (+ `response`; optional "
    "`system`, `history`), or alpaca `instruction` (+ `input`, `output`)"
)
# ms-swift's subsets of swift/self-cognition: (suffix of every query, prefix of every answer).
SELF_COGNITION_SUBSETS = {
    "default": ("", ""),
    "qwen3": (" /no_think", "<think>\n\n</think>\n\n"),
    "empty_think": ("", "<think>\n\n</think>\n\n"),
}
SELF_COGNITION_NAME = re.compile(r"self[-_]cognition", re.IGNORECASE)
# Columns turned into `messages` (and `tag`, which self-cognition rows use to pick the zh/en name): not kept.
CONSUMED_COLUMNS = ("messages", "system", "query", "response", "history", "tag", "instruction", "input", "output")
Row = dict[str, Any]


class DataError(HpcqwenError):
    """A dataset that cannot be read or has a row in an unknown format."""

    reference = "data"

    def __init__(
        self, message: str, file: str | Path, row: int | None = None, *, hint: str = ""
    ) -> None:
        self.file = str(file)
        self.row = row
        where = self.file if row is None else f"{self.file}: row {row}"
        super().__init__(message, where=where, hint=hint)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class DatasetRef:
    """One parsed `path[:subset][#N]` reference."""

    path: str
    subset: str | None = None
    count: int | None = None


def split_dataset_ref(ref: str) -> tuple[str, str, str | None]:
    """`path[:subset][#N]` -> (path, subset or '', count text or None), nothing checked. A ':' followed by
    a folder name is part of the path, not a subset separator. The one place this syntax is split."""
    head, hash_sign, count = ref.rpartition("#")
    if not hash_sign:
        head = ref
    path, colon, subset = head.rpartition(":")
    if not colon or not subset or "/" in subset:
        path, subset = head, ""
    return path, subset, count if hash_sign else None


def parse_dataset_ref(ref: str) -> DatasetRef:
    """Split `path[:subset][#N]` into its parts (`split_dataset_ref`) and check them.

    Args:
        ref: The reference as written in the job spec.

    Returns:
        The parsed reference.

    Raises:
        ValueError: When `#N` is not a positive integer or the path is empty.
    """
    path, subset, count_text = split_dataset_ref(ref)
    if count_text is not None and (not re.fullmatch(r"\d+", count_text.strip()) or int(count_text) == 0):
        raise ValueError(
            f"dataset {ref!r}: the sample count after '#' must be a positive integer, "
            f"got {count_text!r}"
        )
    count = int(count_text) if count_text is not None else None
    if not path.strip():
        raise ValueError(f"dataset {ref!r}: empty path")
    return DatasetRef(path=path.strip(), subset=subset.strip() or None, count=count)


def is_self_cognition(path: str) -> bool:
    """True for the self-cognition dataset: its last path part, less a data-file suffix, is its name."""
    name = Path(path.rstrip("/")).name
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return SELF_COGNITION_NAME.fullmatch(name) is not None


def subset_error(ref: str) -> tuple[str, str] | None:
    """Why the subset of a reference cannot work, as (message, hint); None when it can or when it
    cannot be known here (a hub dataset's own subsets). Checked on the login node at submit.
    """
    try:
        parsed = parse_dataset_ref(ref)
    except ValueError:
        return None  # a bad `#N`: reported by the count check
    subset, path = parsed.subset, Path(parsed.path)
    if subset is None:
        return None
    if is_self_cognition(parsed.path):
        if subset in SELF_COGNITION_SUBSETS:
            return None
        return (f"unknown subset {subset!r} of the self-cognition dataset",
                f"use one of {', '.join(SELF_COGNITION_SUBSETS)} (ms-swift's subsets)")
    if path.is_file():
        return (f"subset {subset!r} given for the file {path}", "a subset selects a subfolder of a dataset folder")
    if path.is_dir() and not (path / subset).is_dir():
        have = sorted(p.name for p in path.iterdir() if p.is_dir())
        return (f"no subfolder {subset!r} in the dataset folder {path}", f"subsets here: {', '.join(have) or 'none'}")
    return None


def resolve_files(ref: DatasetRef, base_dir: str | Path) -> list[Path]:
    """The data files a reference names, sorted, relative paths taken from `base_dir`.

    Raises:
        DataError: For a missing path, a hub id, or a folder without data files.
    """
    if ref.subset and is_self_cognition(ref.path):  # its subsets transform rows, not pick files
        ref = DatasetRef(ref.path, None, ref.count)
    path = Path(ref.path).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if ref.subset and path.is_file():
        raise DataError(
            f"subset {ref.subset!r} given for a file",
            path,
            hint="a subset selects a subfolder of a local dataset folder",
        )
    if ref.subset:
        path = path / ref.subset
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"no {'/'.join(SUFFIXES)} files in this folder", path)
        return files
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref.path) and not Path(ref.path).suffix:
        local = _download_hub_dataset(ref.path)
        if local is not None:
            return resolve_files(DatasetRef(str(local), ref.subset, ref.count), base_dir)
        raise DataError(
            f"{ref.path!r} is not a local path, and hub datasets are not downloaded "
            "(the nodes are offline)",
            path,
            hint=f"download it first (huggingface-cli download --repo-type dataset {ref.path} "
            "--local-dir DIR) and reference DIR",
        )
    raise DataError("no such file or folder", path)


def _download_hub_dataset(repo_id: str) -> Path | None:
    """A hub dataset's files in the Hugging Face cache (set HF_HOME to the shared filesystem), or
    None when the hub is off (HF_HUB_OFFLINE) or unreachable. huggingface_hub locks its cache, so
    ranks that race here download once."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, repo_type="dataset",
                                      allow_patterns=[f"*{s}" for s in SUFFIXES] + [f"**/*{s}" for s in SUFFIXES]))
    except Exception:  # offline, unknown repo, no access: the caller reports it with a hint
        return None


def read_records(path: Path) -> list[Row]:
    """All records of one JSON / JSONL / CSV / Parquet file, as dicts in file order.

    Raises:
        DataError: For unreadable content, naming the file and (1-based) row.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        return list(pq.read_table(path).to_pylist())
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [_csv_record(r, path, i) for i, r in enumerate(csv.DictReader(f), start=1)]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e}", path) from e
        return [_as_record(r, path, i) for i, r in enumerate(records, start=1)]
    return _read_json_lines(text, path)


def _read_json_lines(text: str, path: Path) -> list[Row]:
    records = []
    for i, line in enumerate(line for line in text.splitlines() if line.strip()):
        try:
            records.append(_as_record(json.loads(line), path, i + 1))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e}", path, i + 1) from e
    return records


def _as_record(value: Any, path: Path, row: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(
            f"expected an object with columns {EXPECTED}, got {type(value).__name__}", path, row
        )
    return value


def _csv_record(record: dict[str, Any], path: Path, row: int) -> Row:
    """CSV cells are strings; `messages` and `history` cells hold JSON (ms-swift's CSV layout)."""
    out: Row = dict(record)
    for key in ("messages", "history"):
        if isinstance(out.get(key), str) and out[key].strip():
            try:
                out[key] = json.loads(out[key])
            except json.JSONDecodeError as e:
                raise DataError(f"column {key!r} is not valid JSON: {e}", path, row) from e
    return out


def normalize_row(record: Row, file: str | Path, row: int, *, system: str | None = None) -> Row:
    """Turn one record into `{"messages": [...], **extra columns}`.

    Args:
        record: The raw record.
        file: Its file, for error messages.
        row: Its 1-based row number, for error messages.
        system: Default system prompt for rows that carry none.

    Returns:
        The normalized row.

    Raises:
        DataError: When the row matches no known format.
    """
    if record.get("messages") is not None:
        messages = _check_messages(record["messages"], file, row)
    elif record.get("query") is not None:  # a response is optional: prompt-only rows (distill, GRPO)
        messages = _query_response_messages(record, file, row)
    elif record.get("instruction") is not None:  # alpaca: instruction (+ input) -> output
        messages = _alpaca_messages(record)
    else:
        raise DataError(
            f"columns {sorted(record)} match no known format; expected {EXPECTED}", file, row
        )
    row_system = record.get("system") or system
    if row_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(row_system)})
    extras = {k: v for k, v in record.items() if k not in CONSUMED_COLUMNS}
    return {"messages": messages, **extras}


def _check_messages(value: Any, file: str | Path, row: int) -> list[Row]:
    if not isinstance(value, list) or not value:
        raise DataError(f"`messages` must be a non-empty list, got {value!r:.80}", file, row)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"messages[{i}] needs a role in {ROLES}, got {m!r:.80}", file, row)
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            raise DataError(
                f"messages[{i}].content must be a string, got {m.get('content')!r:.80}", file, row
            )
    return [dict(m) for m in value]


def _query_response_messages(record: Row, file: str | Path, row: int) -> list[Row]:
    messages: list[Row] = []
    for pair in record.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(
                f"`history` must hold [query, response] pairs, got {pair!r:.80}", file, row
            )
        messages += [
            {"role": "user", "content": str(pair[0])},
            {"role": "assistant", "content": str(pair[1])},
        ]
    messages.append({"role": "user", "content": str(record["query"])})
    if record.get("response") is not None:
        messages.append({"role": "assistant", "content": str(record["response"])})
    return messages


def _alpaca_messages(record: Row) -> list[Row]:
    """Alpaca rows (alpaca-gpt4-data-en/zh): the input, when there is one, follows the instruction."""
    text = str(record["instruction"])
    if record.get("input"):
        text += "\n" + str(record["input"])
    messages: list[Row] = [{"role": "user", "content": text}]
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": str(record["output"])})
    return messages


def fill_placeholders(
    row: Row,
    names: dict[str, str | Sequence[str] | None],
    tag: str | None,
    file: str | Path,
    index: int,
) -> Row:
    """Replace `{{NAME}}`/`{{AUTHOR}}` in every message; a `[zh, en]` pair is picked by `tag`.

    Raises:
        DataError: When a placeholder appears and its name is not set.
    """
    for message in row["messages"]:
        content = message.get("content")
        if not isinstance(content, str):
            continue
        for placeholder, knob in PLACEHOLDERS.items():
            if placeholder not in content:
                continue
            value = _pick_name(names.get(knob), tag)
            if not value:
                raise DataError(
                    f"self-cognition placeholder {placeholder} found but `{knob}` is not set",
                    file,
                    index,
                    hint=f"set task.{knob} (one name, or [Chinese, English])",
                )
            content = content.replace(placeholder, value)
        message["content"] = content
    return row


def _pick_name(value: str | Sequence[str] | None, tag: str | None) -> str | None:
    """ms-swift's rule: `[zh, en]` names, the Chinese one for rows tagged `zh`."""
    if value is None or isinstance(value, str):
        return value
    names = list(value)
    if len(names) == 1:
        return names[0]
    return names[0] if tag == "zh" else names[1]


def sample_indices(n_rows: int, count: int | None, seed: str) -> list[int]:
    """`#N` sampling as ms-swift does it: whole repeats of the data, then a seeded sample.

    Args:
        n_rows: Rows available.
        count: Rows wanted (None: all, in order).
        seed: Seed string; the same seed always gives the same indices.

    Returns:
        Row indices; `count` of them.
    """
    if count is None:
        return list(range(n_rows))
    repeats, rest = divmod(count, n_rows)
    rng = random.Random(seed)
    return list(range(n_rows)) * repeats + sorted(rng.sample(range(n_rows), rest))


def load_dataset_rows(
    refs: Sequence[str],
    *,
    base_dir: str | Path,
    seed: int,
    model_name: str | Sequence[str] | None = None,
    model_author: str | Sequence[str] | None = None,
    system: str | None = None,
) -> list[Row]:
    """Read, validate, sample and concatenate every referenced dataset.

    Args:
        refs: Dataset references `path[:subset][#N]`, mixed in this order.
        base_dir: Folder that relative paths are taken from (the job spec's folder).
        seed: Sampling seed.
        model_name: Fills `{{NAME}}` (one name or `[zh, en]`).
        model_author: Fills `{{AUTHOR}}` (one name or `[zh, en]`).
        system: Default system prompt for rows without one.

    Returns:
        Rows `{"messages": [...], **extra columns}`.

    Raises:
        ValueError: For a malformed reference.
        DataError: For missing files, unknown formats, empty datasets or unset names.
    """
    names = {"model_name": model_name, "model_author": model_author}
    out: list[Row] = []
    for i, text in enumerate(refs):
        ref = parse_dataset_ref(text)
        rows = _load_ref(ref, base_dir, system, names)
        # Not the reference text: a copy of the data elsewhere must sample the same rows (cache key).
        keep = sample_indices(len(rows), ref.count, seed=f"{seed}:{i}")
        out.extend(_copy(rows[j]) for j in keep)
    return out


def _load_ref(
    ref: DatasetRef, base_dir: str | Path, system: str | None, names: dict[str, Any]
) -> list[Row]:
    rows: list[Row] = []
    files = resolve_files(ref, base_dir)
    for path in files:
        for j, record in enumerate(read_records(path), start=1):
            row = normalize_row(record, path, j, system=system)
            rows.append(fill_placeholders(row, names, record.get("tag"), path, j))
    if not rows:
        raise DataError("the dataset has no rows", files[0] if len(files) == 1 else ref.path)
    if ref.subset and is_self_cognition(ref.path):
        rows = [_self_cognition_subset(row, ref.subset, files[0]) for row in rows]
    return rows


def _self_cognition_subset(row: Row, subset: str, file: Path) -> Row:
    """ms-swift's SelfCognitionPreprocessor: a suffix on every query, a prefix on every answer.

    Raises:
        DataError: For a subset ms-swift does not define.
    """
    if subset not in SELF_COGNITION_SUBSETS:
        raise DataError(f"unknown subset {subset!r} of the self-cognition dataset", file,
                        hint=f"use one of {', '.join(SELF_COGNITION_SUBSETS)}")
    suffix, prefix = SELF_COGNITION_SUBSETS[subset]
    for message in row["messages"]:
        if message["role"] == "user" and isinstance(message.get("content"), str):
            message["content"] += suffix
        elif message["role"] == "assistant" and isinstance(message.get("content"), str):
            message["content"] = prefix + message["content"]
    return row


def _copy(row: Row) -> Row:
    """Oversampled rows repeat; give each its own message dicts so later edits stay local."""
    return {**row, "messages": [dict(m) for m in row["messages"]]}
