"""Validation on the login node reads bounded amounts of the data, whatever its size (measured with the
kernel's count of bytes read by this process, /proc/self/io rchar)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpcqwen.errors import SpecError
from hpcqwen.preflight import checked_spec
from hpcqwen.spec import load_spec, read_source
from hpcqwen.tasks.scan import SCAN_FILE_BYTES, SCAN_TOTAL_BYTES

ROW = json.dumps({"messages": [{"role": "user", "content": "Who are you?"},
                               {"role": "assistant", "content": "I am {{NAME}}, made by {{AUTHOR}}."}]}) + "\n"
SLACK = 2 << 20  # the spec, the model's config, Python's own reads


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _sparse(path: Path, size: int, head: str = "", tail: str = "") -> Path:
    """A file of `size` bytes that takes no disk: a hole between `head` and `tail`."""
    with path.open("wb") as f:
        f.write(head.encode())
        f.truncate(size - len(tail.encode()))
        f.seek(0, 2)
        f.write(tail.encode())
    return path


def _spec(write_spec, model: Path, data: list[Path], kind: str = "sft") -> Path:
    extra = "  reward_funcs: [accuracy]\n" if kind == "grpo" else ""
    return write_spec(f"name: scan\ntask:\n  kind: {kind}\n  model: {model}\n"
                      f"  dataset: [{', '.join(map(str, data))}]\n{extra}")


def _load_counting(spec: Path) -> tuple[int, float, Exception | None]:
    """Bytes read, CPU seconds (wall time would measure the parallel suite's load) and the error."""
    before, start = _rchar(), time.process_time()
    try:
        checked_spec(read_source(spec))  # the spec and preflight's file checks (check, submit)
        error = None
    except SpecError as e:
        error = e
    return _rchar() - before, time.process_time() - start, error


@pytest.fixture(autouse=True)
def _warm(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Imports and first-use reads happen before anything is counted."""
    small = tmp_path / "warm.jsonl"
    small.write_text(ROW.replace("{{NAME}}", "x").replace("{{AUTHOR}}", "y"))
    load_spec(_spec(write_spec, tiny_qwen3_dir, [small]))


def test_a_big_file_is_not_read_in_full_for_placeholders(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    big = _sparse(tmp_path / "big.jsonl", 200 << 20, tail=ROW)  # 200 MB, the placeholder at its very end
    read, took, error = _load_counting(_spec(write_spec, tiny_qwen3_dir, [big]))
    assert read < SCAN_FILE_BYTES + SLACK, read
    assert error is None and took < 1.0  # beyond the cap: the runner finds it (and names the row)


def test_placeholders_within_the_cap_are_still_found(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    cut = SCAN_FILE_BYTES - (1 << 20) - 3 - ROW.index("{{NAME}}")  # the placeholder spans two 1 MiB reads
    near = _sparse(tmp_path / "near.jsonl", 64 << 20, head=" " * cut + ROW.replace("{{AUTHOR}}", "lab"))
    read, _, error = _load_counting(_spec(write_spec, tiny_qwen3_dir, [near]))
    assert isinstance(error, SpecError) and "task.model_name" in error.issues[0].key
    assert read < SCAN_FILE_BYTES + SLACK


def test_many_files_are_read_within_the_total_cap(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    files = [_sparse(folder / f"part-{i:02d}.jsonl", 8 << 20) for i in range(12)]  # 96 MB in all
    read, took, error = _load_counting(_spec(write_spec, tiny_qwen3_dir, [folder, *files[:3]]))
    assert error is None and read < SCAN_TOTAL_BYTES + SLACK and took < 1.0, read


def test_a_big_json_array_is_not_parsed_for_its_columns(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    rows = json.dumps([{"query": "1+1?", "solution": "2"}])
    big = _sparse(tmp_path / "prompts.json", 100 << 20, head=rows[:-1] + ",", tail='{"query": "x"}]')
    read, took, _ = _load_counting(_spec(write_spec, tiny_qwen3_dir, [big], kind="grpo"))
    assert read < SCAN_FILE_BYTES + SLACK and took < 1.0, read
