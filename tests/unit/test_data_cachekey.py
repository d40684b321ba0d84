"""The SFT cache key follows content and code, not paths; one process per node reads the inputs to
find the entry, none loads the tokenizer on a hit; the build's bytes do not depend on num_proc."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcqwen.data import prepare_sft_dataset

REPO = Path(__file__).resolve().parents[2]
OPTS = dict(max_length=128, model_name="bot", model_author="lab", base_dir="/")


def _copy_inputs(dst: Path, data_dir: Path, tok_dir: Path) -> tuple[list[str], Path]:
    """The shipped data and the tokenizer copied under `dst`; absolute refs, as runners pass them."""
    (dst / "data").mkdir(parents=True)
    for name in ("sft-tiny.jsonl", "self-cognition.jsonl"):
        shutil.copy(data_dir / name, dst / "data" / name)
    shutil.copytree(tok_dir, dst / "tok")
    return [str(dst / "data" / "sft-tiny.jsonl"), str(dst / "data" / "self-cognition.jsonl#16")], dst / "tok"


def test_a_copy_of_the_data_and_tokenizer_elsewhere_hits_the_same_entry(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    cache = tmp_path / "cache"
    refs_a, tok_a = _copy_inputs(tmp_path / "a", data_dir, tiny_tokenizer_dir)
    first = prepare_sft_dataset(refs_a, tokenizer_dir=tok_a, cache_root=cache, **OPTS)
    built_at = (first.path / "COMPLETE").stat().st_mtime_ns
    refs_b, tok_b = _copy_inputs(tmp_path / "elsewhere" / "b", data_dir, tiny_tokenizer_dir)
    second = prepare_sft_dataset(refs_b, tokenizer_dir=tok_b, cache_root=cache, **OPTS)
    assert second.path == first.path and (second.path / "COMPLETE").stat().st_mtime_ns == built_at
    assert second.dataset["input_ids"] == first.dataset["input_ids"]  # `#16` sampled the same rows
    assert str(tmp_path) not in (first.path / "key.json").read_text()  # no path in the key
    # an edited data file is a new entry
    with open(refs_b[0], "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello!"}]}) + "\n")
    third = prepare_sft_dataset(refs_b, tokenizer_dir=tok_b, cache_root=cache, **OPTS)
    assert third.path != first.path and third.stats["num_rows"] == first.stats["num_rows"] + 1


PREPARE = """
import sys
from hpcqwen.data import prepare_sft_dataset
p = prepare_sft_dataset(sys.argv[1:-2], tokenizer_dir=sys.argv[-2], cache_root=sys.argv[-1], max_length=128,
                        model_name="bot", model_author="lab", base_dir="/")
print(p.path)
"""


def test_an_edit_to_the_packing_code_changes_the_key(tmp_path: Path, tiny_tokenizer_dir: Path,
                                                     data_dir: Path) -> None:
    refs, tok = _copy_inputs(tmp_path / "in", data_dir, tiny_tokenizer_dir)
    entries = []
    for name, edit in [("as-shipped", ""), ("edited", "\n# a change to how rows are packed\n")]:
        copy = tmp_path / name
        shutil.copytree(REPO / "hpcqwen", copy / "hpcqwen", ignore=shutil.ignore_patterns("__pycache__"))
        with open(copy / "hpcqwen" / "data" / "packing.py", "a") as f:
            f.write(edit)
        out = subprocess.run([sys.executable, "-c", PREPARE, *refs, str(tok), str(tmp_path / "cache")],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(copy)}, cwd=copy,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        entries.append(out.stdout.strip().splitlines()[-1])
    assert entries[0] != entries[1]


RACER = """
import os, sys, time
import datasets  # imports first: only the reads of the call below are counted
from hpcqwen.data import prepare_sft_dataset

def rchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar:")).split()[1])

go = float(sys.argv[1])
while time.time() < go:
    time.sleep(0.01)
before = rchar()
p = prepare_sft_dataset([sys.argv[2] + "#32"], tokenizer_dir=sys.argv[3], cache_root=sys.argv[4], max_length=64,
                        base_dir="/")
print(rchar() - before, "transformers" in sys.modules, p.path)
"""


def test_one_process_per_node_reads_the_data_and_none_loads_the_tokenizer_on_a_hit(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    big = tmp_path / "big.jsonl"
    rows = (data_dir / "sft-tiny.jsonl").read_text()
    with big.open("w") as f:
        while f.tell() < 12 << 20:
            f.write(rows)
    size = big.stat().st_size
    cache = tmp_path / "cache"
    prepare_sft_dataset([f"{big}#32"], tokenizer_dir=tiny_tokenizer_dir, cache_root=cache, max_length=64,
                        base_dir="/")  # built (and memoized in the test's own TMPDIR)
    env = {**os.environ, "TMPDIR": str(tmp_path / "node-tmp")}  # a node whose memo is empty
    (tmp_path / "node-tmp").mkdir()
    go = time.time() + 8  # all four look up the entry at the same moment, as ranks do
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), str(big), str(tiny_tokenizer_dir), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in results]
    got = [out.split() for out, _ in results]
    read = sorted(int(g[0]) for g in got)
    assert read[-1] >= size and sum(read) < 1.5 * size, (read, size)  # one of the four hashed the file
    assert {g[1] for g in got} == {"False"}  # nobody loaded the tokenizer (transformers not even imported)
    assert len({g[2] for g in got}) == 1


def test_the_bytes_do_not_depend_on_dataset_num_proc(tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hpcqwen.data.parallel")
    refs = [str(data_dir / "sft-tiny.jsonl"), str(data_dir / "self-cognition.jsonl#40")]
    entries = {}
    for num_proc in (1, 3):
        prepared = prepare_sft_dataset(refs, tokenizer_dir=tiny_tokenizer_dir, cache_root=tmp_path / str(num_proc),
                                       packing=True, num_proc=num_proc, **OPTS)
        entries[num_proc] = prepared.path
    assert "tokenizing 104 rows in 3 processes" in caplog.text
    assert entries[1].name == entries[3].name
    files = {n: {p.relative_to(e).as_posix(): p.read_bytes() for p in e.rglob("*") if p.is_file()}
             for n, e in entries.items()}
    assert files[1] == files[3] and len(files[1]) >= 5
