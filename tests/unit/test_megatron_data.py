"""Megatron micro-batches from cache rows: shifted labels, packing (THD), padding, data order."""

from __future__ import annotations

import torch

from hpcqwen.data.packing import pack_examples
from hpcqwen.megatron.data import (
    IGNORE_INDEX,
    iteration_rows,
    iterations_for_epochs,
    make_micro_batch,
    round_up,
)

X = IGNORE_INDEX


def test_unpacked_rows_shift_labels_and_pad() -> None:
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [X, X, 7, 8]}, {"input_ids": [9, 10], "labels": [X, 10]}]
    b = make_micro_batch(rows, packing=False, seq_length=6, pad_token_id=0)
    assert b.tokens.tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]]
    # position t is trained on the token at t + 1; masked positions carry label 0 and loss_mask 0
    assert b.labels.tolist() == [[0, 7, 8, 0, 0, 0], [10, 0, 0, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert b.cu_seqlens is None and b.num_tokens == 6


def test_packed_rows_keep_sequences_apart() -> None:
    examples = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}, {"input_ids": [4, 5], "labels": [X, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [X, X, 8, 9]}]
    packs, _ = pack_examples(examples, max_length=5)  # [6, 7, 8, 9] alone; [1, 2, 3] + [4, 5]
    b = make_micro_batch(packs, packing=True, seq_length=5, pad_token_id=0)
    assert b.tokens.shape == (1, 10)  # micro_batch_size packs end to end, padded to 2 × 5
    assert b.tokens.tolist() == [[6, 7, 8, 9, 1, 2, 3, 4, 5, 0]]
    assert b.cu_seqlens.tolist() == [0, 4, 7, 9, 10] and b.max_seqlen == 4  # the padding is its own sequence
    assert b.cu_seqlens.dtype == torch.int32
    # no label crosses a boundary: the last token of a sequence predicts nothing
    assert b.labels.tolist() == [[0, 8, 9, 0, 2, 3, 0, 5, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0]]


def test_iteration_rows_split_the_global_batch_and_cover_each_epoch() -> None:
    n, gb, dp = 10, 4, 2
    per_iter = [[iteration_rows(n, it, gb, r, dp, seed=3) for r in range(dp)] for it in range(5)]
    flat = [i for it in per_iter for r in it for i in r]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs 0 and 1
    assert flat[:10] != flat[10:20]  # reshuffled per epoch
    assert per_iter[2] == [iteration_rows(n, 2, gb, r, dp, seed=3) for r in range(dp)]  # a pure function
    assert all(len(r) == gb // dp for it in per_iter for r in it)


def test_iteration_counts() -> None:
    assert iterations_for_epochs(100, 1, 16) == 7 and iterations_for_epochs(3, 2, 16) == 1
    assert round_up(8192, 2) == 8192 and round_up(130, 4) == 132
