"""Tokenization and loss masks (labels) for SFT conversations.

Multi-turn conversations (`multi_turn`; the choice ms-swift's `--loss_scale` offers):
- `all_rounds` (default, as ms-swift's default): every assistant turn has loss, and each is
  rendered the way the official Qwen3 template renders the newest turn, with its own `<think>`
  block (an empty one when it has none). TRL maps its `qwen3.jinja` to `qwen3_training.jinja`,
  which renders exactly that and marks each assistant turn with `{% generation %}`, so the loss
  spans come from the template itself. The context of a later turn therefore still holds the
  reasoning of the earlier ones, where the official template drops it at inference.
- `last_round` (ms-swift's `--loss_scale last_round`): the conversation is rendered by the
  tokenizer's own chat template, token for token what the model sees at inference (reasoning of
  turns before the last user query dropped); only the assistant turns after the last user query
  (the final answer, with its tool-call steps) have loss. Works with any chat template.

Loss: on assistant tokens only, from the end of `<|im_start|>assistant\\n` to `<|im_end|>`
inclusive; the newline after `<|im_end|>` is never generated, so it gets no loss. With
`ignore_empty_think` an empty `<think></think>` block and the newlines after it get none either;
a token that reaches into the answer (`" Paris"` after the block) keeps its loss.

Length (`truncation_strategy`, ms-swift's names and default): `delete` drops a conversation
longer than `max_length`, `left` cuts its head, `right` its tail (the answer may then lose its
`<|im_end|>`). A row left without any loss token is dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen.data.templates import choose_chat_template, qwen3_template_path
from hpcqwen.data.templates import qwen3_chat_template as qwen3_chat_template  # older imports use this module

IGNORE_INDEX = -100
LOSS_SCALES = ("default", "ignore_empty_think")
MULTI_TURN_MODES = ("all_rounds", "last_round")
TRUNCATION_STRATEGIES = ("delete", "left", "right")
# ms-swift's ignore_empty_think (`<think>\\s*</think>\\s*`), but only newlines after the block: the
# template strips those from the answer, so a space there belongs to the answer.
EMPTY_THINK = re.compile(r"<think>\s*</think>[\r\n]*")
END_OF_TURN = "<|im_end|>"

def open_tokenizer(path: str | Path, chat_template: str = "auto") -> tuple[Any, str]:
    """Load a tokenizer from a local folder and choose its chat template.

    Args:
        path: Model or tokenizer folder.
        chat_template: `auto`, `qwen3` or `model` (see `hpcqwen.data.templates`).

    Returns:
        The tokenizer and one line for the run log saying which template it carries.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template, note = choose_chat_template(tok.chat_template, chat_template)
    return tok, note


def load_tokenizer(path: str | Path, chat_template: str = "auto") -> Any:
    """`open_tokenizer` without the note: a known Qwen3 template is replaced by hpcqwen's copy."""
    return open_tokenizer(path, chat_template)[0]


_TRAINING_TEMPLATES: dict[str, str] = {}


def training_template(tokenizer: Any) -> str:
    """The prefix-preserving template with generation markers that `all_rounds` renders with.

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
                f"{e} multi_turn: all_rounds needs a template TRL knows: set multi_turn: last_round (renders "
                f"with the model's own template) or chat_template: qwen3 ({qwen3_template_path()})."
            ) from e
    return _TRAINING_TEMPLATES[key]


def rendering_template(tokenizer: Any, multi_turn: str = "all_rounds") -> str:
    """The template text that renders the training examples (it enters the cache key)."""
    return str(tokenizer.chat_template) if multi_turn == "last_round" else training_template(tokenizer)


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    max_length: int,
    loss_scale: str = "default",
    enable_thinking: bool | None = None,
    multi_turn: str = "all_rounds",
    truncation_strategy: str = "delete",
) -> dict[str, list[int]] | None:
    """Tokenize one conversation with loss on assistant turns only.

    Args:
        tokenizer: A tokenizer from `load_tokenizer` (fast, with offsets).
        messages: `[{"role", "content"}, ...]`; reasoning inline as `<think>...</think>` or in
            `reasoning_content`.
        max_length: Most tokens kept (see `truncation_strategy`).
        loss_scale: `default`, or `ignore_empty_think` to give an empty
            `<think>\\n\\n</think>\\n\\n` block no loss (the reference guide's option 1).
        enable_thinking: False strips the reasoning from every assistant turn, so it trains the
            non-thinking rendering (`<think>\\n\\n</think>\\n\\n` + answer); None/True keep
            the data as it is.
        multi_turn: `all_rounds` or `last_round` (module docstring).
        truncation_strategy: `delete`, `left` or `right`.

    Returns:
        `{"input_ids": [...], "labels": [...]}`, labels `-100` where there is no loss; None when
        the conversation is longer than `max_length` and `truncation_strategy` is `delete`.

    Raises:
        ValueError: For an unknown option, or a template that does not render the prompt of an
            answer as a prefix of the conversation (`last_round`).
    """
    ids, labels = _encode_full(tokenizer, messages, loss_scale, enable_thinking, multi_turn)
    kept = truncate(ids, labels, max_length, truncation_strategy)
    return None if kept is None else {"input_ids": kept[0], "labels": kept[1]}


def truncate(
    ids: list[int], labels: list[int], max_length: int, strategy: str
) -> tuple[list[int], list[int]] | None:
    """Apply a truncation strategy: None (`delete`), the last (`left`) or the first (`right`) tokens.

    Raises:
        ValueError: For an unknown strategy.
    """
    if strategy not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation_strategy must be one of {TRUNCATION_STRATEGIES}, got {strategy!r}")
    if len(ids) <= max_length:
        return ids, labels
    if strategy == "delete":
        return None
    if strategy == "left":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


def _encode_full(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    loss_scale: str,
    enable_thinking: bool | None,
    multi_turn: str,
) -> tuple[list[int], list[int]]:
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
    if multi_turn not in MULTI_TURN_MODES:
        raise ValueError(f"multi_turn must be one of {MULTI_TURN_MODES}, got {multi_turn!r}")
    if enable_thinking is False:
        messages = [_strip_reasoning(m) for m in messages]
    render = render_last_round if multi_turn == "last_round" else render_with_loss_spans
    text, spans = render(tokenizer, messages, enable_thinking=enable_thinking)
    masked = [m.span() for s, e in spans if (m := EMPTY_THINK.match(text, s, e))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    no_loss = masked if loss_scale == "ignore_empty_think" else []
    return ids, _labels_from_spans(ids, enc["offset_mapping"], spans, no_loss)


def _thinking_kwargs(enable_thinking: bool | None) -> dict[str, Any]:
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


def render_with_loss_spans(
    tokenizer: Any, messages: list[dict[str, Any]], *, enable_thinking: bool | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """`all_rounds`: render with the training template; the text and the character spans with loss."""
    from transformers.utils.chat_template_utils import render_jinja_template

    # Annotated as `-> str`, but with the assistant mask it returns (texts, generation indices).
    result: Any = render_jinja_template(
        conversations=[messages],
        chat_template=training_template(tokenizer),
        return_assistant_tokens_mask=True,
        **_thinking_kwargs(enable_thinking),
    )
    rendered, indices = result
    text: str = rendered[0]
    return text, [_trim_after_end(text, start, end) for start, end in indices[0]]


def render_last_round(
    tokenizer: Any, messages: list[dict[str, Any]], *, enable_thinking: bool | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """`last_round`: render with the tokenizer's own template; loss on the answers after the last query.

    Each answer's span starts where the inference prompt for it (the conversation before it plus
    the assistant header) ends, and runs to its `<|im_end|>`.

    Raises:
        ValueError: When that prompt is not a prefix of the rendered conversation.
    """
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, **_thinking_kwargs(enable_thinking))
    spans = []
    for j in _last_round_answers(messages):
        # No enable_thinking here: an empty think block of the answer is part of the answer's span.
        prompt: str = tokenizer.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ValueError(
                f"the chat template renders the prompt of message {j} differently inside the conversation "
                "(not a prefix), so its answer cannot be located; use multi_turn: all_rounds"
            )
        stop = text.find(END_OF_TURN, len(prompt))
        spans.append((len(prompt), len(text) if stop < 0 else stop + len(END_OF_TURN)))
    return text, spans


def _last_round_answers(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the assistant messages after the last user query (a tool response is no query)."""
    queries = [i for i, m in enumerate(messages) if m.get("role") == "user" and not _is_tool_response(m)]
    if not queries:
        return []
    return [i for i in range(queries[-1] + 1, len(messages)) if messages[i].get("role") == "assistant"]


def _is_tool_response(message: dict[str, Any]) -> bool:
    """Qwen3's older tool format: a user turn holding only `<tool_response>...</tool_response>`."""
    content = message.get("content")
    return isinstance(content, str) and content.startswith("<tool_response>") and content.endswith(
        "</tool_response>")


def _trim_after_end(text: str, start: int, end: int) -> tuple[int, int]:
    """Cut the span right after its last `<|im_end|>` (the template's trailing newline)."""
    stop = text.rfind(END_OF_TURN, start, end)
    return (start, stop + len(END_OF_TURN)) if stop >= 0 else (start, end)


def _labels_from_spans(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    no_loss: Sequence[tuple[int, int]] = (),
) -> list[int]:
    """A token has loss when all of its characters lie inside one loss span, unless all of them
    lie inside one `no_loss` region (an empty think block): a token that reaches past the block
    into the answer keeps its loss."""
    import numpy as np

    # Vectorised: a Python loop over tokens dominates the build time of large datasets.
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    lo, hi = bounds[:, 0], bounds[:, 1]
    keep = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        keep |= (lo >= start) & (hi <= end) & (hi > lo)
    for start, end in no_loss:
        keep &= ~((lo >= start) & (hi <= end))
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
        tokenizer: A tokenizer from `load_tokenizer`.
        messages: Conversation; a final assistant turn (the reference answer) is dropped.
        enable_thinking: False renders `<think>\\n\\n</think>\\n\\n` after the assistant header.
        response_prefix: Text the model's answer must continue from (ms-swift `--response_prefix`).

    Returns:
        The prompt text (tokenize it with `add_special_tokens=False`).
    """
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    prompt: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **_thinking_kwargs(enable_thinking)
    )
    return prompt + (response_prefix or "")


@dataclass(frozen=True)
class EncodeStats:
    """What tokenization did to a dataset: logged at start-up and kept in the cache's stats.json."""

    num_rows: int
    num_kept: int
    truncation_strategy: str
    num_truncated: int  # longer than max_length and cut (`left`/`right`)
    num_deleted: int  # longer than max_length and dropped (`delete`)
    num_no_loss: int  # dropped: no token with loss (within max_length)
    num_tokens: int
    num_loss_tokens: int


def encode_rows(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    max_length: int,
    loss_scale: str = "default",
    enable_thinking: bool | None = None,
    multi_turn: str = "all_rounds",
    truncation_strategy: str = "delete",
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode every row, apply the truncation strategy, and drop rows with no loss token left.

    Returns:
        The encoded examples and their statistics.

    Raises:
        ValueError: For an unknown option, or a row `last_round` cannot render (naming the row).
    """
    out: list[dict[str, list[int]]] = []
    counts: Counter[str] = Counter()
    for i, row in enumerate(rows, start=1):
        try:
            ids, labels = _encode_full(tokenizer, row["messages"], loss_scale, enable_thinking, multi_turn)
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from e
        kept = truncate(ids, labels, max_length, truncation_strategy)
        if len(ids) > max_length:
            counts["deleted" if kept is None else "truncated"] += 1
        if kept is not None and any(label != IGNORE_INDEX for label in kept[1]):
            out.append({"input_ids": kept[0], "labels": kept[1]})
        elif kept is not None:
            counts["no_loss"] += 1
    stats = EncodeStats(
        num_rows=len(rows),
        num_kept=len(out),
        truncation_strategy=truncation_strategy,
        num_truncated=counts["truncated"],
        num_deleted=counts["deleted"],
        num_no_loss=counts["no_loss"],
        num_tokens=sum(len(e["input_ids"]) for e in out),
        num_loss_tokens=sum(sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in out),
    )
    return out, stats
