"""Packing isolation through a real tiny Qwen3: a packed row gives each sequence's own logits.

transformers 5.x builds a block-diagonal mask from restarting `position_ids` for eager, sdpa and
flex attention, but only without an attention mask and without a KV cache; the two negative
controls below pin both conditions, so a regression shows up as a failing test, not as silently
cross-attending packs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hpcqwen.data import prepare_sft_dataset
from hpcqwen.data.packing import PackedCollator, PaddingCollator, pack_examples
from hpcqwen.data.tokenize import encode_rows, load_tokenizer

pytestmark = pytest.mark.cpu_train
VARLEN_CORRECT = ["eager", "sdpa", "flex_attention"]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer_dir: Path, data_dir: Path) -> list[dict[str, list[int]]]:
    from hpcqwen.data.formats import load_dataset_rows

    rows = load_dataset_rows(["sft-tiny.jsonl#6"], base_dir=data_dir, seed=3)
    encoded, _ = encode_rows(load_tokenizer(tiny_tokenizer_dir), rows, max_length=64)
    return encoded


def _model(path: Path, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation=attn, dtype=torch.float32
    ).eval()


def _split(logits: torch.Tensor, seq_lens: list[int]) -> list[torch.Tensor]:
    return list(torch.split(logits[0], seq_lens))


def _alone(model: Any, examples: list[dict[str, list[int]]]) -> list[torch.Tensor]:
    return [
        model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples
    ]


@pytest.mark.parametrize(
    ("attn", "moe"),
    # flex_attention compiles its block mask (~15 s on 2 cores): dense only.
    [("eager", False), ("sdpa", False), ("flex_attention", False), ("eager", True), ("sdpa", True)],
)
@torch.no_grad()
def test_packed_logits_equal_each_sequence_run_alone(
    attn: str, moe: bool, examples: list[dict[str, list[int]]], request: pytest.FixtureRequest
) -> None:
    model = _model(request.getfixturevalue("tiny_qwen3_moe_dir" if moe else "tiny_qwen3_dir"), attn)
    packs, _ = pack_examples(examples, max_length=256)
    assert len(packs) == 1 and len(packs[0]["seq_lens"]) == 6
    batch = PackedCollator()(packs)
    packed = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits
    # One pack keeps its examples in their original order.
    assert packs[0]["input_ids"] == [t for e in examples for t in e["input_ids"]]
    for got, want in zip(
        _split(packed, packs[0]["seq_lens"]), _alone(model, examples), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_loss_is_the_token_weighted_mean_of_the_sequence_losses(
    tiny_qwen3_dir: Path, examples: list[dict[str, list[int]]]
) -> None:
    model = _model(tiny_qwen3_dir, "sdpa")
    batch = PackedCollator()(examples)
    packed = model(**batch, use_cache=False).loss
    total = count = 0.0
    for e in examples:
        n = sum(lab != -100 for lab in e["labels"][1:])
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        total += model(input_ids=ids, labels=labels, use_cache=False).loss * n
        count += n
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("control", ["attention_mask", "use_cache"])
@torch.no_grad()
def test_negative_controls_show_the_sequences_would_otherwise_mix(
    control: str, tiny_qwen3_dir: Path, examples: list[dict[str, list[int]]]
) -> None:
    model = _model(tiny_qwen3_dir, "sdpa")
    batch = PackedCollator()(examples)
    kw: dict[str, Any] = {"use_cache": control == "use_cache"}
    if control == "attention_mask":
        kw["attention_mask"] = torch.ones_like(batch["input_ids"])
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kw).logits
    lens = [len(e["input_ids"]) for e in examples]
    diffs = [
        (g - w).abs().max().item()
        for g, w in zip(_split(packed, lens), _alone(model, examples), strict=True)
    ]
    assert diffs[0] < 1e-5 and max(diffs[1:]) > 1e-3  # the first sequence has nothing before it


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_trainer_learns_from_cached_data_with_our_collators(
    packing: bool, tmp_path: Path, tiny_qwen3_dir: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    prepared = prepare_sft_dataset(
        ["sft-tiny.jsonl"],
        tokenizer_dir=tiny_tokenizer_dir,
        base_dir=data_dir,
        cache_root=tmp_path / "cache",
        max_length=256,
        packing=packing,
        loss_scale="ignore_empty_think",
    )
    tok = load_tokenizer(tiny_tokenizer_dir)
    collator = PackedCollator() if packing else PaddingCollator(pad_token_id=tok.pad_token_id)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        learning_rate=3e-3,
        per_device_train_batch_size=2 if packing else 8,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir), attn_implementation="sdpa")
    trainer = Trainer(
        model=model, args=args, train_dataset=prepared.dataset, data_collator=collator
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert (
        model.config.use_cache is False
    )  # Trainer 5.x sets it from args.use_cache: packing relies on it
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]) * 0.8, (
        losses
    )
