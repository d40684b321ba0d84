"""SFT data: read datasets, tokenize with the Qwen3 template, pack, and cache on the shared FS.

`prepare_sft_dataset` is the one call a runner (or `hpcqwen prepare`) makes: it hashes the
inputs (`cachekey`), builds the cache entry once across all ranks and nodes (in `num_proc`
processes, `parallel`), and memory-maps it. The entry is never written to afterwards:
`split_eval` keeps its index in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen.caching import CacheSettings, cached
from hpcqwen.data.cachekey import sft_key_parts
from hpcqwen.data.formats import (
    DataError,
    DatasetRef,
    load_dataset_rows,
    parse_dataset_ref,
)
from hpcqwen.data.packing import PackedCollator, PackStats, PaddingCollator, pack_examples
from hpcqwen.data.parallel import encode_rows_parallel
from hpcqwen.data.tokenize import encode_conversation, load_tokenizer, open_tokenizer, render_prompt

__all__ = [
    "DataError",
    "DatasetRef",
    "PackStats",
    "PackedCollator",
    "PaddingCollator",
    "PreparedData",
    "encode_conversation",
    "load_dataset_rows",
    "load_tokenizer",
    "open_tokenizer",
    "parse_dataset_ref",
    "prepare_sft_dataset",
    "render_prompt",
    "split_eval",
]

DATASET_DIR = "dataset"
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class PreparedData:
    """A cache entry, memory-mapped: the dataset, its folder and its build statistics."""

    path: Path
    dataset: Any  # datasets.Dataset with input_ids, labels (+ position_ids, seq_lens if packed)
    stats: dict[str, Any]

    def summary(self) -> str:
        """One start-up log line: rows, what the truncation strategy did, tokens, (if packed) fill."""
        s = self.stats
        line = (
            f"data: {s['num_rows']} rows -> {s['num_kept']} examples ({_length_note(s)}), "
            f"{s['num_tokens']} tokens, {s['num_loss_tokens']} with loss"
        )
        if "fill_ratio" in s:
            line += f"; {s['num_packs']} packs of {s['max_length']}, fill {s['fill_ratio']:.1%}"
        return line + f" [{self.path}]"


def _length_note(s: dict[str, Any]) -> str:
    """`truncation_strategy delete: 3 rows over max_length 2048 dropped; 1 without loss dropped`."""
    over = {"delete": (s["num_deleted"], "dropped"), "left": (s["num_truncated"], "cut at the head"),
            "right": (s["num_truncated"], "cut at the tail")}
    count, done = over[s["truncation_strategy"]]
    note = f"truncation_strategy {s['truncation_strategy']}: {count} rows over max_length {s['max_length']} {done}"
    return note + (f"; {s['num_no_loss']} without a loss token dropped" if s["num_no_loss"] else "")


def prepare_sft_dataset(
    refs: Sequence[str],
    *,
    tokenizer_dir: str | Path,
    base_dir: str | Path,
    cache_root: str | Path,
    max_length: int,
    loss_scale: str = "default",
    packing: bool = False,
    enable_thinking: bool | None = None,
    multi_turn: str = "all_rounds",
    truncation_strategy: str = "delete",
    chat_template: str = "auto",
    seed: int = 42,
    model_name: str | Sequence[str] | None = None,
    model_author: str | Sequence[str] | None = None,
    system: str | None = None,
    num_proc: int = 1,
    cache: CacheSettings | None = None,
) -> PreparedData:
    """Tokenized (and packed) SFT data from the shared cache, built there first if missing.

    Args:
        refs: Dataset references `path[:subset][#N]`.
        tokenizer_dir: Model or tokenizer folder; its tokenizer files enter the cache key.
        base_dir: Folder that relative dataset paths are taken from.
        cache_root: Shared cache folder.
        max_length: Longest example, and the pack size when packing.
        loss_scale: `default` or `ignore_empty_think`.
        packing: Pack examples padding-free into rows of `max_length`.
        enable_thinking: False trains the non-thinking rendering (reasoning stripped).
        multi_turn: `all_rounds` or `last_round` (`hpcqwen.data.tokenize`).
        truncation_strategy: `delete`, `left` or `right` for rows over `max_length`.
        chat_template: `auto`, `qwen3` or `model` (`hpcqwen.data.templates`); with the tokenizer
            files and TRL's templates (both in the key) it decides the template that renders the rows.
        seed: `#N` sampling seed.
        model_name: Fills `{{NAME}}` in self-cognition rows.
        model_author: Fills `{{AUTHOR}}` in self-cognition rows.
        system: Default system prompt.
        num_proc: Processes that tokenize when the entry is built (the bytes do not depend on it).
        cache: Entry permissions and the wait for another process's build (default: CacheSettings()).

    Returns:
        The memory-mapped dataset and its statistics.

    Raises:
        DataError: For unreadable or malformed data.
        ValueError: For a malformed reference.
        CacheError: For an unusable cache folder, or a wait for another build that timed out.
    """
    from datasets import load_from_disk  # type: ignore[import-untyped]

    options: dict[str, Any] = dict(
        max_length=max_length,
        loss_scale=loss_scale,
        packing=packing,
        enable_thinking=enable_thinking,
        multi_turn=multi_turn,
        truncation_strategy=truncation_strategy,
        chat_template=chat_template,
        seed=seed,
        model_name=model_name,
        model_author=model_author,
        system=system,
    )
    parts = sft_key_parts(refs, base_dir=base_dir, tokenizer_dir=tokenizer_dir, options=options)

    def build(folder: Path) -> None:  # the tokenizer is loaded only when there is something to build
        _build(folder, load_tokenizer(tokenizer_dir, chat_template), refs, base_dir, num_proc=num_proc,
               **{k: v for k, v in options.items() if k != "chat_template"})

    entry = cached(parts, build, cache_root, cache or CacheSettings())
    stats = json.loads((entry / STATS_FILE).read_text())
    return PreparedData(path=entry, dataset=load_from_disk(str(entry / DATASET_DIR)), stats=stats)


def _build(
    folder: Path,
    tokenizer: Any,
    refs: Sequence[str],
    base_dir: str | Path,
    *,
    num_proc: int,
    max_length: int,
    loss_scale: str,
    packing: bool,
    enable_thinking: bool | None,
    multi_turn: str,
    truncation_strategy: str,
    seed: int,
    **row_options: Any,
) -> None:
    from datasets import Dataset

    rows = load_dataset_rows(refs, base_dir=base_dir, seed=seed, **row_options)
    try:
        examples, enc = encode_rows_parallel(
            tokenizer,
            rows,
            num_proc,
            max_length=max_length,
            loss_scale=loss_scale,
            enable_thinking=enable_thinking,
            multi_turn=multi_turn,
            truncation_strategy=truncation_strategy,
        )
    except ValueError as e:
        raise DataError(str(e), ", ".join(refs)) from e
    if not examples:
        raise DataError(
            f"no example is left: {_length_note({**vars(enc), 'max_length': max_length})}", ", ".join(refs),
            hint="raise max_length, or set truncation_strategy: left or right",
        )
    stats: dict[str, Any] = {**vars(enc), "max_length": max_length}
    if packing:
        examples, packed = pack_examples(examples, max_length)
        stats.update(num_packs=packed.num_packs, fill_ratio=packed.fill_ratio)
    columns = {name: [e[name] for e in examples] for name in examples[0]}
    Dataset.from_dict(columns).save_to_disk(str(folder / DATASET_DIR))
    (folder / STATS_FILE).write_text(json.dumps(stats, indent=1))


def split_eval(dataset: Any, ratio: float, seed: int) -> tuple[Any, Any]:
    """Hold out `ratio` of a prepared dataset for evaluation, without writing to its cache entry.

    `Dataset.train_test_split` would write its index files next to the entry's Arrow files (an
    immutable, maybe another user's, folder), and its `keep_in_memory=True` fails on a dataset
    loaded from disk (datasets 5.2); so the same split (a seeded permutation, the first
    ceil(ratio * n) rows for evaluation) is selected here with the indices kept in memory.

    Returns:
        (train, eval) datasets.
    """
    import math

    import numpy as np

    permutation = np.random.default_rng(seed).permutation(len(dataset))
    n_eval = math.ceil(ratio * len(dataset))
    return (dataset.select(permutation[n_eval:], keep_in_memory=True),
            dataset.select(permutation[:n_eval], keep_in_memory=True))
