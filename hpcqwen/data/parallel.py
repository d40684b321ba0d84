"""Tokenize rows in `dataset_num_proc` processes, with the same bytes as one process.

Rows are cut into contiguous chunks, encoded by forked workers (which inherit the tokenizer and
the rows, so neither is pickled), and concatenated in chunk order; statistics are summed. The
result does not depend on the number of processes (a test compares the entries' bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from hpcqwen.data.tokenize import encode_rows, training_template

log = logging.getLogger(__name__)

CHUNKS_PER_PROC = 4  # smaller chunks even out rows of very different lengths
# What the forked workers inherit: (tokenizer, rows, encode options); set only during a build.
_WORK: tuple[Any, list[dict[str, Any]], dict[str, Any]] | None = None


def encode_rows_parallel(
    tokenizer: Any, rows: list[dict[str, Any]], num_proc: int, **options: Any
) -> tuple[list[dict[str, list[int]]], Any]:
    """`encode_rows(tokenizer, rows, **options)` spread over `num_proc` processes.

    Args:
        tokenizer: A tokenizer from `load_tokenizer`.
        rows: Normalized rows.
        num_proc: Worker processes; 1 encodes in this process.
        **options: Passed to `encode_rows` (max_length, loss_scale, enable_thinking, ...).

    Returns:
        The encoded examples in row order, and their summed statistics.
    """
    if num_proc <= 1 or len(rows) < 2 * num_proc:
        return encode_rows(tokenizer, rows, **options)
    log.info("tokenizing %d rows in %d processes", len(rows), num_proc)
    training_template(tokenizer)  # TRL derives it in seconds; once here, inherited by every worker
    global _WORK
    _WORK = (tokenizer, rows, options)
    # fork: workers share the parent's tokenizer and rows; they only tokenize (no CUDA, no threads).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_encode_chunk, _chunks(len(rows), num_proc * CHUNKS_PER_PROC)))
    finally:
        _WORK = None
    examples = [example for part, _ in parts for example in part]
    stats = [s for _, s in parts]
    first = stats[0]
    summed = {f.name: sum(getattr(s, f.name) for s in stats) if isinstance(getattr(first, f.name), int)
              else getattr(first, f.name) for f in dataclasses.fields(first)}  # counts add up; settings are shared
    return examples, type(stats[0])(**summed)


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _encode_chunk(bounds: tuple[int, int]) -> tuple[list[dict[str, list[int]]], Any]:
    assert _WORK is not None, "encode_rows_parallel sets the work before forking"
    tokenizer, rows, options = _WORK
    return encode_rows(tokenizer, rows[bounds[0]:bounds[1]], **options)
