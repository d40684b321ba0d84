"""Packing: bin assignment, pack layout, fill ratio, and the two collators."""

from __future__ import annotations

import random

import pytest
import torch

from hpcqwen.data.packing import PackedCollator, PaddingCollator, pack_examples, pack_indices
from hpcqwen.data.tokenize import IGNORE_INDEX


def _examples(lengths: list[int]) -> list[dict[str, list[int]]]:
    out = []
    for k, n in enumerate(lengths):
        ids = [1000 * (k + 1) + j for j in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def test_pack_indices_places_every_example_once_within_capacity() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    packs = pack_indices(lengths, 128)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    # Best-fit decreasing is close to the lower bound on this input (and deterministic).
    assert len(packs) <= -(-sum(lengths) // 128) + 3
    assert packs == pack_indices(lengths, 128)


def test_pack_indices_rejects_examples_longer_than_a_pack() -> None:
    with pytest.raises(ValueError, match="1 examples exceed max_length=8"):
        pack_indices([3, 9, 2], 8)


def test_pack_layout_positions_restart_and_boundary_labels_are_masked() -> None:
    examples = _examples([5, 3, 4, 6])
    packs, stats = pack_examples(examples, 10)
    assert (stats.num_sequences, stats.num_packs, stats.num_tokens) == (4, 2, 18)
    assert stats.fill_ratio == pytest.approx(18 / 20)
    assert "4 sequences -> 2 packs of 10, fill 90.0%" in stats.summary()
    seen = []
    for pack in packs:
        assert (
            len(pack["input_ids"])
            == len(pack["labels"])
            == len(pack["position_ids"])
            == sum(pack["seq_lens"])
        )
        start = 0
        for n in pack["seq_lens"]:
            assert pack["position_ids"][start : start + n] == list(range(n))
            original = next(
                e for e in examples if e["input_ids"] == pack["input_ids"][start : start + n]
            )
            assert pack["labels"][start] == IGNORE_INDEX
            assert pack["labels"][start + 1 : start + n] == original["labels"][1:]
            seen.append(n)
            start += n
    assert sorted(seen) == [3, 4, 5, 6]


def test_packed_collator_matches_transformers_flattening_collator() -> None:
    from transformers import DataCollatorWithFlattening

    examples = _examples([5, 3, 4])
    ours = PackedCollator()(examples)
    theirs = DataCollatorWithFlattening(return_tensors="pt")(examples)
    assert "attention_mask" not in ours  # a mask would switch off the packed-sequence detection
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], theirs[key]), key


def test_packed_collator_concatenates_packs_and_emits_flash_kwargs() -> None:
    packs, _ = pack_examples(_examples([5, 3, 4, 6]), 10)
    batch = PackedCollator(return_flash_attn_kwargs=True)(packs)
    assert batch["input_ids"].shape == (1, 18)
    assert (batch["position_ids"] == 0).sum() == 4
    lengths = (batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).tolist()
    assert sorted(lengths) == [3, 4, 5, 6] and batch["max_length_q"] == 6
    assert batch["cu_seq_lens_q"].dtype == torch.int32


def test_padding_collator_pads_inputs_labels_and_mask() -> None:
    batch = PaddingCollator(pad_token_id=7, pad_to_multiple_of=4)(_examples([5, 2]))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1, 2:].tolist() == [7] * 6
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 6
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 2]
