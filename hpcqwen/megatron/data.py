"""SFT rows from the shared tokenization/packing cache -> Megatron micro-batches.

The cache (`hpcqwen.data.prepare_sft_dataset`) holds Hugging Face style examples: `input_ids` and
`labels` aligned (-100 where no loss; the model shifts). Megatron's `GPTModel(labels=...)` returns
the loss of position t against `labels[t]` without shifting, so labels are shifted here: the
label of token t is the next token's label, and the last position gets none. In a pack every
sequence starts with a -100 label (`hpcqwen.data.packing`), so no token learns across a boundary.

Shapes are fixed, which Megatron's schedule (and pipeline parallelism) wants:
- unpacked: `micro_batch_size` rows, each right-padded to `seq_length`;
- packed (`packing`): the `micro_batch_size` packs of a micro-batch laid end to end in one row
  (THD: batch 1), `cu_seqlens` marking every sequence, the tail padding as its own sequence.
`seq_length` must be a multiple of the tensor-parallel size for sequence parallelism; the caller
rounds it.

Which rows an iteration uses is a pure function of (iteration, seed), so a resumed job continues
with exactly the batches it would have seen: epoch e visits the rows in the order of a permutation
seeded with `seed + e`; iteration i takes global samples [i × GB, (i + 1) × GB) of that stream,
and data-parallel rank r the r-th contiguous slice of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on the CPU (tensors are moved to the GPU in the forward step)."""

    tokens: Any  # [b, s] long
    labels: Any  # [b, s] long, 0 where loss_mask is 0
    loss_mask: Any  # [b, s] float
    position_ids: Any  # [b, s] long
    cu_seqlens: Any = None  # [n + 1] int32 (packed only)
    max_seqlen: int = 0
    num_tokens: int = 0  # real (non-padding) tokens


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Label of each position = the next position's label; the last position has none."""
    return [*labels[1:], IGNORE_INDEX]


def make_micro_batch(rows: Sequence[dict[str, Any]], *, packing: bool, seq_length: int,
                     pad_token_id: int) -> MicroBatch:
    """Tensors of one micro-batch from cache rows (`input_ids`, `labels`, packs also `seq_lens`).

    Args:
        rows: The rows of this micro-batch.
        packing: Lay the rows end to end in one THD row (`seq_length` per row in total).
        seq_length: Tokens per row (unpacked) or per row of the micro-batch (packed).
        pad_token_id: Filler for the padding positions (never in the loss).

    Returns:
        The micro-batch.

    Raises:
        ValueError: When a row is longer than `seq_length`.
    """
    import torch

    too_long = [len(r["input_ids"]) for r in rows if len(r["input_ids"]) > seq_length]
    if too_long:
        raise ValueError(f"row of {too_long[0]} tokens exceeds seq_length {seq_length}")
    real = sum(len(r["input_ids"]) for r in rows)
    if packing:
        return _packed(rows, seq_length * len(rows), pad_token_id, real)
    ids, labels, positions = [], [], []
    for r in rows:
        pad = seq_length - len(r["input_ids"])
        ids.append(list(r["input_ids"]) + [pad_token_id] * pad)
        labels.append(shift_labels(r["labels"]) + [IGNORE_INDEX] * pad)
        positions.append(list(range(seq_length)))
    return _tensors(torch.tensor(ids), torch.tensor(labels), torch.tensor(positions), None, 0, real)


def _packed(rows: Sequence[dict[str, Any]], total: int, pad_token_id: int, real: int) -> MicroBatch:
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for r in rows:
        ids += list(r["input_ids"])
        labels += shift_labels(r["labels"])
        seq_lens = list(r.get("seq_lens") or [len(r["input_ids"])])
        lengths += seq_lens
        positions += [p for n in seq_lens for p in range(n)]
    pad = total - len(ids)
    if pad:
        ids += [pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += list(range(pad))
        lengths.append(pad)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return _tensors(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([positions]), cu, max(lengths), real)


def _tensors(ids: Any, labels: Any, positions: Any, cu: Any, max_len: int, real: int) -> MicroBatch:
    mask = labels != IGNORE_INDEX
    return MicroBatch(tokens=ids, labels=labels.masked_fill(~mask, 0), loss_mask=mask.float(),
                      position_ids=positions, cu_seqlens=cu, max_seqlen=max_len, num_tokens=real)


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.random.RandomState(seed + epoch).permutation(n))


def iteration_rows(n_rows: int, iteration: int, global_batch: int, dp_rank: int, dp_size: int,
                   seed: int) -> list[int]:
    """Dataset row indices of this data-parallel rank for one iteration (see the module docstring)."""
    per_rank = global_batch // dp_size
    start = iteration * global_batch + dp_rank * per_rank
    return [_epoch_order(n_rows, seed, k // n_rows)[k % n_rows] for k in range(start, start + per_rank)]


def iterations_for_epochs(n_rows: int, epochs: float, global_batch: int) -> int:
    """Iterations that cover `epochs` passes over `n_rows` (at least one)."""
    return max(1, -(-int(n_rows * epochs) // global_batch))


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple."""
    return -(-n // multiple) * multiple
