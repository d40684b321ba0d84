"""Bounded reads of local datasets while a spec is validated on the (shared) login node.

Validation looks into data files (self-cognition placeholders, first rows, distill prompts) but
must stay fast and light whatever the data's size: it reads at most SCAN_FILE_BYTES of a file,
SCAN_TOTAL_BYTES for a whole spec, and SCAN_MAX_FILES files of a folder. What lies beyond is
checked by the runner on the node, which reads everything anyway (a `{{NAME}}` placeholder without
`model_name` fails there, naming the file and row).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from hpcqwen.data.formats import split_dataset_ref
from hpcqwen.tasks._common import is_hub_id

SCAN_FILE_BYTES = 4 << 20
SCAN_TOTAL_BYTES = 16 << 20
SCAN_MAX_FILES = 64
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BLOCK_BYTES = 1 << 20


def local_files(refs: Iterable[str]) -> Iterator[Path]:
    """The local data files of dataset references (folders: their first SCAN_MAX_FILES data files)."""
    for ref in refs:
        path = Path(split_dataset_ref(ref)[0])
        if is_hub_id(str(path)):
            continue
        if path.is_file():
            yield path
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file())
            yield from files[:SCAN_MAX_FILES]


def contains_any(refs: Iterable[str], needles: Iterable[str]) -> bool:
    """Whether any needle occurs in the first bytes of the local data files (within the caps)."""
    patterns = [n.encode("utf-8") for n in needles]
    overlap = max(len(p) for p in patterns) - 1  # a needle cut by a block boundary is still found
    budget = SCAN_TOTAL_BYTES
    for path in local_files(refs):
        left, tail = min(SCAN_FILE_BYTES, budget), b""
        with path.open("rb") as f:
            while left > 0 and (block := f.read(min(BLOCK_BYTES, left))):
                left, budget = left - len(block), budget - len(block)
                window = tail + block
                if any(p in window for p in patterns):
                    return True
                tail = window[-overlap:] if overlap else b""
        if budget <= 0:
            break
    return False

