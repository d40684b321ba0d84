"""Token-level labels on the REAL Qwen3 tokenizer (151,669 tokens, TRL's Qwen3 template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpcqwen.data.tokenize import (
    IGNORE_INDEX,
    encode_conversation,
    encode_rows,
    load_tokenizer,
    render_prompt,
    training_template,
)

EMPTY = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir: Path) -> Any:
    t = load_tokenizer(qwen3_tokenizer_dir)
    assert len(t) == 151669 and t.convert_tokens_to_ids("<think>") == 151667  # really the real one
    return t


def _loss_runs(tok: Any, enc: dict[str, list[int]]) -> list[str]:
    """Decoded maximal runs of tokens that carry loss."""
    runs, cur = [], []
    for tid, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def _msgs(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * len(turns)
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]


def test_single_turn_loss_is_the_answer_and_im_end_and_matches_the_inference_prompt(
    tok: Any,
) -> None:
    msgs = _msgs("What is 2+2?", "<think>\nadd\n</think>\n\n4", system="Be brief.")
    enc = encode_conversation(tok, msgs, max_length=512)
    assert _loss_runs(tok, enc) == ["<think>\nadd\n</think>\n\n4<|im_end|>"]
    # The loss starts exactly where the inference prompt ends, token for token.
    prompt_ids = tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"]
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)
    assert enc["input_ids"][:first] == prompt_ids
    # Training and inference templates render a single-turn conversation identically.
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    # The newline after <|im_end|> is never generated, so it has no loss.
    assert [enc["input_ids"][-1]] == tok.encode("\n") and enc["labels"][-1] == IGNORE_INDEX


def test_ignore_empty_think_masks_exactly_the_empty_block(tok: Any) -> None:
    msgs = _msgs("Capital of Zhejiang?", EMPTY + "Hangzhou.")
    default = encode_conversation(tok, msgs, max_length=512)
    ignored = encode_conversation(tok, msgs, max_length=512, loss_scale="ignore_empty_think")
    assert default["input_ids"] == ignored["input_ids"]
    changed = [
        i
        for i, (a, b) in enumerate(zip(default["labels"], ignored["labels"], strict=True))
        if a != b
    ]
    assert tok.decode([default["input_ids"][i] for i in changed]) == EMPTY
    assert changed == list(range(changed[0], changed[0] + 4))  # <think> \n\n </think> \n\n
    assert _loss_runs(tok, default) == [EMPTY + "Hangzhou.<|im_end|>"]
    assert _loss_runs(tok, ignored) == ["Hangzhou.<|im_end|>"]


def test_an_answer_without_think_gets_the_empty_block_that_ignore_empty_think_masks(
    tok: Any,
) -> None:
    plain = encode_conversation(
        tok, _msgs("q", "Hangzhou."), max_length=512, loss_scale="ignore_empty_think"
    )
    explicit = encode_conversation(
        tok, _msgs("q", EMPTY + "Hangzhou."), max_length=512, loss_scale="ignore_empty_think"
    )
    assert plain == explicit


def test_ignore_empty_think_leaves_real_reasoning_alone(tok: Any) -> None:
    msgs = _msgs("q", "<think>\nreason\n</think>\n\nanswer")
    default = encode_conversation(tok, msgs, max_length=512)
    assert (
        encode_conversation(tok, msgs, max_length=512, loss_scale="ignore_empty_think") == default
    )


def test_no_think_queries_pass_through_unchanged(tok: Any) -> None:
    msgs = _msgs("Where is the capital of Zhejiang? /no_think", EMPTY + "Hangzhou.")
    enc = encode_conversation(tok, msgs, max_length=512)
    text = tok.decode(enc["input_ids"])
    assert "<|im_start|>user\nWhere is the capital of Zhejiang? /no_think<|im_end|>" in text
    assert _loss_runs(tok, enc) == [EMPTY + "Hangzhou.<|im_end|>"]
    assert render_prompt(tok, msgs).endswith("/no_think<|im_end|>\n<|im_start|>assistant\n")


def test_multi_turn_trains_every_assistant_turn_with_its_own_reasoning(tok: Any) -> None:
    msgs = _msgs(
        "q1",
        "<think>\nr1\n</think>\n\nA1",
        "q2 /no_think",
        "A2",
        "q3",
        "<think>\nr3\n</think>\n\nA3",
        system="S",
    )
    for loss_scale, second in [
        ("default", EMPTY + "A2<|im_end|>"),
        ("ignore_empty_think", "A2<|im_end|>"),
    ]:
        enc = encode_conversation(tok, msgs, max_length=512, loss_scale=loss_scale)
        assert _loss_runs(tok, enc) == [
            "<think>\nr1\n</think>\n\nA1<|im_end|>",
            second,
            "<think>\nr3\n</think>\n\nA3<|im_end|>",
        ]
    # Nothing of the system or user turns carries loss.
    text = tok.decode(
        [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    assert text.count("<|im_start|>user\n") == 3 and "<|im_start|>system\nS<|im_end|>" in text


def test_reasoning_content_field_is_rendered_like_inline_think(tok: Any) -> None:
    inline = encode_conversation(tok, _msgs("q", "<think>\nr\n</think>\n\nA"), max_length=512)
    field = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "A", "reasoning_content": "r"},
    ]
    assert encode_conversation(tok, field, max_length=512) == inline


def test_enable_thinking_false_trains_the_non_thinking_rendering(tok: Any) -> None:
    msgs = _msgs("q", "<think>\nsecret reasoning\n</think>\n\nA")
    enc = encode_conversation(tok, msgs, max_length=512, enable_thinking=False)
    assert _loss_runs(tok, enc) == [EMPTY + "A<|im_end|>"]
    assert "secret" not in tok.decode(enc["input_ids"])
    assert tok.decode(enc["input_ids"]).startswith(render_prompt(tok, msgs, enable_thinking=False))


@pytest.mark.parametrize("answer", [" Paris.", "  Paris.", "\tParis.", "Paris."])
def test_ignore_empty_think_keeps_the_answer_s_first_token_after_whitespace(tok: Any, answer: str) -> None:
    msgs = _msgs("Capital of France?", EMPTY + answer)
    enc = encode_conversation(tok, msgs, max_length=512, loss_scale="ignore_empty_think")
    default = encode_conversation(tok, msgs, max_length=512)
    assert enc is not None and default is not None
    # Only the four tokens of the empty block lose their loss: the answer keeps every token it has.
    assert _loss_runs(tok, default) == [EMPTY + answer + "<|im_end|>"]
    assert "".join(_loss_runs(tok, enc)) == answer + "<|im_end|>"
    assert sum(a != b for a, b in zip(default["labels"], enc["labels"], strict=True)) == 4


LONG = _msgs("a long question " * 20, "the answer")  # 64 tokens


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("delete", None),
        ("left", ["the answer<|im_end|>"]),  # the head is cut: the answer keeps its end of turn
        ("right", []),  # the tail is cut: nothing of the answer is left
    ],
)
def test_truncation_strategies_on_one_conversation(tok: Any, strategy: str, expected: list[str] | None) -> None:
    enc = encode_conversation(tok, LONG, max_length=16, truncation_strategy=strategy)
    if expected is None:
        assert enc is None
        return
    assert enc is not None and len(enc["input_ids"]) == len(enc["labels"]) == 16
    full = encode_conversation(tok, LONG, max_length=4096)
    assert full is not None
    window = full["input_ids"][-16:] if strategy == "left" else full["input_ids"][:16]
    assert enc["input_ids"] == window
    assert [r.replace(EMPTY, "") for r in _loss_runs(tok, enc)] == expected


def test_right_truncation_trains_an_answer_without_its_end_of_turn(tok: Any) -> None:
    msgs = _msgs("q", "one two three four five six seven eight")
    cut = encode_conversation(tok, msgs, max_length=14, truncation_strategy="right")
    assert cut is not None and "<|im_end|>" not in "".join(_loss_runs(tok, cut))
    assert encode_conversation(tok, msgs, max_length=14) is None  # the default, delete, drops it


@pytest.mark.parametrize(
    ("strategy", "counts"),  # (kept, truncated, deleted, without loss)
    [("delete", (2, 0, 2, 0)), ("left", (4, 2, 0, 0)), ("right", (2, 2, 0, 2))],
)
def test_encode_rows_counts_what_each_strategy_did(
    tok: Any, strategy: str, counts: tuple[int, int, int, int]
) -> None:
    rows = [{"messages": m} for m in (LONG, _msgs("hi", "yo"), LONG, _msgs("ok", "fine"))]
    kept, stats = encode_rows(tok, rows, max_length=16, truncation_strategy=strategy)
    assert (stats.num_kept, stats.num_truncated, stats.num_deleted, stats.num_no_loss) == counts
    assert stats.num_rows == 4 and stats.truncation_strategy == strategy and len(kept) == counts[0]
    assert stats.num_tokens == sum(len(e["input_ids"]) for e in kept)
    assert all(len(e["input_ids"]) <= 16 for e in kept)


def test_unknown_truncation_strategy_is_refused(tok: Any) -> None:
    with pytest.raises(ValueError, match="truncation_strategy must be one of"):
        encode_conversation(tok, _msgs("q", "a"), max_length=64, truncation_strategy="split")


def test_render_prompt_thinking_modes_and_response_prefix(tok: Any) -> None:
    msgs = _msgs("who are you?", "I am Qwen.")
    head = "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, msgs) == head
    assert render_prompt(tok, msgs, enable_thinking=True) == head
    assert render_prompt(tok, msgs, enable_thinking=False) == head + EMPTY
    assert render_prompt(tok, msgs, response_prefix=EMPTY) == head + EMPTY


def test_unknown_loss_scale_and_untrainable_template(tok: Any, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="loss_scale must be one of"):
        encode_conversation(tok, _msgs("q", "a"), max_length=8, loss_scale="last_round")
    other = load_tokenizer(tiny_tokenizer_dir)
    other.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="set multi_turn: last_round .* or chat_template: qwen3"):
        training_template(other)
