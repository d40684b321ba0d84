"""The cache key of a prepared SFT dataset: content, options, and the code that makes the bytes.

No path enters the key: data and tokenizer files enter by content (sha256, memoized per node by
`hpcqwen.digests`, so one process per node reads them), each dataset reference by its ordered
files' formats and digests and its `#N`. A copy of the same data or model folder elsewhere hits
the same entry. The source of `hpcqwen/data/*.py` (reading, formats, templating, tokenizing,
packing) and the versions of the libraries that render and store the rows enter too, so an edit
to that code never hits an entry the old code built. Nothing here loads the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from hpcqwen.data.formats import parse_dataset_ref, resolve_files
from hpcqwen.data.templates import qwen3_template_path
from hpcqwen.digests import file_digests
from hpcqwen.modelfiles import TOKENIZER_FILES

# TRL's Qwen3 templates: `load_tokenizer` attaches the first, labels come from the second.
TEMPLATE_FILES = ("qwen3.jinja", "qwen3_training.jinja")
LIBRARIES = ("tokenizers", "transformers", "trl", "datasets")


def sft_key_parts(
    refs: Sequence[str], *, base_dir: str | Path, tokenizer_dir: str | Path, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Everything that decides the bytes of a prepared SFT dataset, ready for `cache_key`.

    Args:
        refs: Dataset references `path[:subset][#N]`, in mixing order.
        base_dir: Folder that relative dataset paths are taken from.
        tokenizer_dir: Model or tokenizer folder.
        options: The build options (max_length, packing, seed, ...), JSON-able.

    Returns:
        The key parts.

    Raises:
        DataError: For a dataset reference that names no files.
    """
    parsed = [parse_dataset_ref(r) for r in refs]
    files = [resolve_files(ref, base_dir) for ref in parsed]
    tok = Path(tokenizer_dir)
    tok_files = [tok / name for name in TOKENIZER_FILES if (tok / name).is_file()]
    templates = [p for p in (qwen3_template_path().parent / n for n in TEMPLATE_FILES) if p.is_file()]
    flat = [f for group in files for f in group]
    digests = iter(file_digests([*flat, *tok_files, *templates]))  # one pass, one node lock
    data = [{"count": ref.count, "files": [[f.suffix, next(digests)] for f in group]}
            for ref, group in zip(parsed, files, strict=True)]
    return {
        "kind": "sft",
        "data": data,
        "tokenizer": {p.name: next(digests) for p in tok_files},
        "templates": {p.name: next(digests) for p in templates},
        "code": code_digest(),
        "libraries": {name: version(name) for name in LIBRARIES},
        **options,
    }


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source files of hpcqwen/data (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
