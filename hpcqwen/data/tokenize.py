"""Qwen3 chat template, tokenization and loss masks (labels) for SFT.

Rendering: every tokenizer gets TRL's `qwen3.jinja` (the hub's Qwen3 template). For training
TRL maps that exact text to `qwen3_training.jinja`, which differs in two ways that matter here:
it wraps each assistant turn in `{% generation %}` markers (so the loss spans come from the
template itself, not from guessing), and it keeps the reasoning of *every* assistant turn. The
inference template drops the reasoning of turns before the last user query; training on that
rendering would teach the model to answer earlier turns without a `<think>` block at all. Keeping
each turn's own `<think>` (empty if it had none) is what ms-swift's default and TRL do, and for a
single-turn conversation both templates give the same bytes (a unit test pins this).

Loss: on assistant tokens only, from the end of `<|im_start|>assistant\\n` to `<|im_end|>`
inclusive; the newline after `<|im_end|>` is never generated, so it gets no loss.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
LOSS_SCALES = ("default", "ignore_empty_think")
# ms-swift's ignore_empty_think pattern (loss_scale config `{"<think>\\s*</think>\\s*": [0.0]}`).
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
# What Qwen3 renders after the assistant header with thinking off (ms-swift `--response_prefix`).
EMPTY_THINK_PREFIX = "<think>\n\n</think>\n\n"
END_OF_TURN = "<|im_end|>"


def qwen3_template_path() -> Path:
    """TRL's `chat_templates/qwen3.jinja`, found without importing TRL (seconds of imports).

    Raises:
        ModuleNotFoundError: When TRL is not installed (the `train` extra).
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "TRL provides the Qwen3 chat template: pip install 'hpcqwen[train]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen3.jinja"


def qwen3_chat_template() -> str:
    """The Qwen3 chat template every hpcqwen tokenizer uses (TRL's copy of the hub template)."""
    return qwen3_template_path().read_text(encoding="utf-8")


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer from a local folder and attach the Qwen3 chat template.

    TRL matches templates byte for byte; a model folder may carry an older revision that renders
    the same but is not recognised, so the template is always replaced (notes/ml-stack-cpu.md §3).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = qwen3_chat_template()
    return tok


_TRAINING_TEMPLATES: dict[str, str] = {}


def training_template(tokenizer: Any) -> str:
    """The prefix-preserving template with generation markers used to build labels.

    Raises:
        ValueError: When TRL has no training variant of the tokenizer's template.
    """
    from trl.chat_template_utils import get_training_chat_template

    key = tokenizer.chat_template
    if key not in _TRAINING_TEMPLATES:  # TRL renders probe chats to decide; do it once per template
        try:
            _TRAINING_TEMPLATES[key] = get_training_chat_template(tokenizer) or key
        except ValueError as e:
            raise ValueError(
                f"{e} Load the tokenizer with hpcqwen.data.tokenize.load_tokenizer "
                f"(it attaches {qwen3_template_path()})."
            ) from e
    return _TRAINING_TEMPLATES[key]


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    max_length: int,
    loss_scale: str = "default",
    enable_thinking: bool | None = None,
) -> dict[str, list[int]]:
    """Tokenize one conversation with loss on assistant turns only.

    Args:
        tokenizer: A tokenizer from `load_tokenizer` (fast, with offsets).
        messages: `[{"role", "content"}, ...]`; reasoning inline as `<think>...</think>` or in
            `reasoning_content`.
        max_length: Keep at most this many tokens (the tail is cut).
        loss_scale: `default`, or `ignore_empty_think` to give an empty
            `<think>\\n\\n</think>\\n\\n` block no loss (the reference guide's option 1).
        enable_thinking: False strips the reasoning from every assistant turn, so it trains the
            non-thinking rendering (`<think>\\n\\n</think>\\n\\n` + answer); None/True keep
            the data as it is.

    Returns:
        `{"input_ids": [...], "labels": [...]}`, labels `-100` where there is no loss.

    Raises:
        ValueError: For an unknown `loss_scale`.
    """
    ids, labels = _encode_full(tokenizer, messages, loss_scale, enable_thinking)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _encode_full(
    tokenizer: Any, messages: list[dict[str, Any]], loss_scale: str, enable_thinking: bool | None
) -> tuple[list[int], list[int]]:
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
    if enable_thinking is False:
        messages = [_strip_reasoning(m) for m in messages]
    text, spans = render_with_loss_spans(tokenizer, messages, enable_thinking=enable_thinking)
    if loss_scale == "ignore_empty_think":
        spans = [_skip_empty_think(text, start, end) for start, end in spans]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return ids, _labels_from_spans(ids, enc["offset_mapping"], spans)


def render_with_loss_spans(
    tokenizer: Any, messages: list[dict[str, Any]], *, enable_thinking: bool | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render with the training template; return the text and the character spans with loss."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    # Annotated as `-> str`, but with the assistant mask it returns (texts, generation indices).
    result: Any = render_jinja_template(
        conversations=[messages],
        chat_template=training_template(tokenizer),
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    rendered, indices = result
    text: str = rendered[0]
    return text, [_trim_after_end(text, start, end) for start, end in indices[0]]


def _trim_after_end(text: str, start: int, end: int) -> tuple[int, int]:
    """Cut the span right after its last `<|im_end|>` (the template's trailing newline)."""
    stop = text.rfind(END_OF_TURN, start, end)
    return (start, stop + len(END_OF_TURN)) if stop >= 0 else (start, end)


def _skip_empty_think(text: str, start: int, end: int) -> tuple[int, int]:
    match = EMPTY_THINK.match(text, start, end)
    return (match.end(), end) if match else (start, end)


def _labels_from_spans(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """A token has loss only when all of its characters lie inside one loss span."""
    import numpy as np

    # Vectorised: a Python loop over tokens dominates the build time of large datasets.
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    lo, hi = bounds[:, 0], bounds[:, 1]
    keep = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        keep |= (lo >= start) & (hi <= end) & (hi > lo)
    labels: list[int] = np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    return labels


def _strip_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") != "assistant":
        return message
    content = message.get("content") or ""
    if "</think>" in content:
        content = content.split("</think>")[-1].lstrip("\n")
    out = {k: v for k, v in message.items() if k not in ("reasoning_content", "reasoning")}
    out["content"] = content
    return out


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    enable_thinking: bool | None = None,
    response_prefix: str | None = None,
) -> str:
    """The inference prompt: the conversation without a trailing assistant turn, plus the header.

    Args:
        tokenizer: A tokenizer with the Qwen3 template (`load_tokenizer`).
        messages: Conversation; a final assistant turn (the reference answer) is dropped.
        enable_thinking: False renders `<think>\\n\\n</think>\\n\\n` after the assistant header.
        response_prefix: Text the model's answer must continue from (ms-swift `--response_prefix`).

    Returns:
        The prompt text (tokenize it with `add_special_tokens=False`).
    """
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return prompt + (response_prefix or "")


@dataclass(frozen=True)
class EncodeStats:
    """What tokenization did to a dataset, printed once at start-up."""

    num_rows: int
    num_kept: int
    num_truncated: int
    num_tokens: int
    num_loss_tokens: int


def encode_rows(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    max_length: int,
    loss_scale: str = "default",
    enable_thinking: bool | None = None,
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode every row; drop the ones with no loss token left (e.g. truncated before the answer).

    Returns:
        The encoded examples and their statistics.
    """
    out, truncated = [], 0
    for row in rows:
        ids, labels = _encode_full(tokenizer, row["messages"], loss_scale, enable_thinking)
        truncated += len(ids) > max_length
        if any(label != IGNORE_INDEX for label in labels[:max_length]):
            out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    stats = EncodeStats(
        num_rows=len(rows),
        num_kept=len(out),
        num_truncated=truncated,
        num_tokens=sum(len(e["input_ids"]) for e in out),
        num_loss_tokens=sum(sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in out),
    )
    return out, stats
