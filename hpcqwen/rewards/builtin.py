"""Built-in GRPO rewards: accuracy, format, cosine, repetition (ms-swift's `--reward_funcs` names).

Every reward has TRL GRPOTrainer's signature, `fn(completions, prompts=None, **kwargs) ->
list[float | None]`: completions are strings or conversational lists `[{"role": "assistant",
"content": ...}]`, and each dataset column comes as a keyword list (`solution=[...]`). TRL 1.16
also passes `completion_ids`, `trainer_state`, `log_extra` and `log_metric`. `None` means "no
opinion on this sample": TRL turns it into NaN, which its nan-aware sums skip. math-verify is
imported lazily so that the login node validates job specs without the `train` extra.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from hpcqwen.rewards import answers

# math-verify's own default; it is enforced with signal.alarm(), which only works in the main
# thread (math_verify/utils.py `timeout`), so other threads run without a limit.
MATH_VERIFY_TIMEOUT_S = 5

# Warn when at least this share of at least this many golds could not be parsed (once per run).
GOLD_WARN_SHARE, GOLD_WARN_MIN = 0.2, 10

_OPEN, _CLOSE = "<think>", "</think>"
_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_TRL_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
_warned_no_timeout = False
_warned_golds = False
_golds = {"seen": 0, "failed": 0}

# Any, not list[float | None]: plugins may be async or misbehave; `call_reward` checks them.
RewardFn = Callable[..., Any]


class Tokenizer(Protocol):
    """Anything with a Hugging Face style `encode` (for `cosine` without `completion_ids`)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """Return the text of one completion, plain or conversational (its last message).

    When TRL parses responses with a response template (it does for tool use), Qwen3's thinking
    lands in `reasoning_content` and `content` keeps only the answer; the `<think>` block is put
    back so that every reward sees what the model generated.
    """
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    message = completion[-1]
    content = message.get("content") or ""
    if not isinstance(content, str):  # multimodal parts: [{"type": "text", "text": ...}]
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    reasoning = message.get("reasoning_content") or message.get("thinking")
    return f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content


def final_answer_region(text: str) -> str:
    """Return the part of a completion that holds its final answer.

    Qwen3 restates candidate answers inside `<think>`, so only what follows the last `</think>`
    is graded (stricter than open-r1/ms-swift, which parse the whole text). A think block that
    never closes (a truncated completion) has no final answer.
    """
    if _CLOSE in text:
        return text.rsplit(_CLOSE, 1)[1]
    return "" if _OPEN in text else text


def _column(name: str, reward: str, n: int, kwargs: Mapping[str, Any]) -> list[Any]:
    if kwargs.get(name) is None:
        have = ", ".join(sorted(k for k in kwargs if k not in _TRL_KWARGS)) or "none"
        raise ValueError(
            f"reward {reward!r} needs a {name!r} column in the dataset (columns passed: {have})"
        )
    values = list(kwargs[name])
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: {len(values)} {name!r} values for {n} completions")
    return values


def _timeout_s() -> int | None:
    global _warned_no_timeout
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    if not _warned_no_timeout:
        _warned_no_timeout = True
        warnings.warn(
            "accuracy reward called outside the main thread: math-verify's signal.alarm timeout "
            "cannot work there, so parsing and verification run without a time limit",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def _grade(text: str, solution: str, timeout_s: int | None) -> float | None:
    gold = answers.parse_gold(solution, timeout_s)
    _count_gold(gold is not None, solution)
    if gold is None:
        return None  # open-r1: an unparseable gold skips the sample instead of scoring it
    return answers.grade(final_answer_region(text), gold, timeout_s)


def _count_gold(parsed: bool, solution: str) -> None:
    """Count golds; warn once per run (rank 0) when a large share could not be parsed."""
    global _warned_golds
    _golds["seen"] += 1
    _golds["failed"] += not parsed
    seen, failed = _golds["seen"], _golds["failed"]
    if parsed or _warned_golds or seen < GOLD_WARN_MIN or failed < GOLD_WARN_SHARE * seen:
        return
    _warned_golds = True
    if os.environ.get("RANK", "0") == "0":
        warnings.warn(
            f"accuracy: {failed} of {seen} solutions ({failed / seen:.0%}) could not be parsed whole and give no "
            f"reward (None), e.g. {solution[:80]!r}; give the answer as \\boxed{{...}}, $...$ or a bare "
            "expression (hpcqwen.rewards.answers)",
            RuntimeWarning,
            stacklevel=4,
        )


def accuracy_reward(
    completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when the final answer equals the `solution` column's, else 0.0; None where the solution
    cannot be parsed whole.

    The rules (`hpcqwen.rewards.answers`): the gold is the solution's `<answer>`, its last
    `\\boxed{}`, its one `$...$` span, or the whole text when it is a bare expression (`1+2x`,
    `y=2x+1`, `\\frac{\\sqrt 3}{2}`), parsed whole; words are a text answer compared as text.
    The completion's answer is what follows `</think>`: its `<answer>`, else its LAST `\\boxed{}`
    (several boxes are not a set), else LaTeX after an anchor such as "the answer is" (open-r1's
    `accuracy_reward`, ms-swift's `MathAccuracy`). Equivalent forms are equal (`\\frac{1}{2}` and
    `0.5`, `2` and `2.0`, `x=3` and `3`). A run where many solutions do not parse warns once.

    Raises:
        ValueError: If there is no `solution` column, or its length differs.
    """
    solutions = _column("solution", "accuracy", len(completions), kwargs)
    timeout_s = _timeout_s()
    return [
        _grade(completion_text(c), str(s), timeout_s)
        for c, s in zip(completions, solutions, strict=True)
    ]


def format_reward(
    completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any
) -> list[float]:
    """1.0 for `<think>...</think>` followed by a non-empty answer, else 0.0.

    ms-swift's `Format` (`^<think>.*?</think>\\s*<answer>.*?</answer>$`) minus the required
    `<answer>` tags, since Qwen3 answers in plain text after `</think>`. An empty
    `<answer></answer>` or a second think block does not count. With `enable_thinking: false`
    Qwen3's chat template puts the (empty) think block in the prompt, so every completion
    scores 0.
    """
    rewards = []
    for c in completions:
        m = _FORMAT.fullmatch(completion_text(c))
        think, answer = (m[1], m[2]) if m else ("", "")
        nested = _OPEN in think + answer or _CLOSE in answer
        ok = m is not None and not nested and re.sub(r"</?answer>", "", answer).strip() != ""
        rewards.append(1.0 if ok else 0.0)
    return rewards


def cosine_value(length: int, max_len: int, value_at_zero: float, value_at_max: float) -> float:
    """Cosine interpolation from `value_at_zero` (length 0) to `value_at_max` (`max_len`).

    ms-swift `CosineReward.cosfn`, with lengths past `max_len` clamped to it: the raw cosine
    rises again after half a period, which ms-swift leaves unclamped.
    """
    progress = (1 - math.cos(min(length, max_len) * math.pi / max_len)) / 2
    return value_at_zero + (value_at_max - value_at_zero) * progress


def cosine_reward(
    completions: Sequence[Any],
    prompts: Sequence[Any] | None = None,
    *,
    cosine_min_len_value_wrong: float = -0.5,
    cosine_max_len_value_wrong: float = 0.0,
    cosine_min_len_value_correct: float = 1.0,
    cosine_max_len_value_correct: float = 0.5,
    cosine_max_len: int = 1000,
    tokenizer: Tokenizer | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Length-scaled correctness ("Demystifying Long CoT", arXiv:2502.03373; ms-swift `cosine`).

    Correct answers fall from `cosine_min_len_value_correct` at length 0 to
    `cosine_max_len_value_correct` at `cosine_max_len`; wrong answers rise from
    `cosine_min_len_value_wrong` to `cosine_max_len_value_wrong`; None where the solution does
    not parse. The defaults are ms-swift's, which sets `cosine_max_len` to
    `max_completion_length` (bind it with `RewardOptions`). Length is in tokens, as in ms-swift
    and the paper, taken from TRL's `completion_ids`; without them, `tokenizer` counts tokens,
    and without a tokenizer characters are counted (open-r1's `cosine_scaled_reward`).

    Raises:
        ValueError: If there is no `solution` column, or its length differs.
    """
    correct = accuracy_reward(completions, prompts, **kwargs)
    texts = [completion_text(c) for c in completions]
    if kwargs.get("completion_ids") is not None:
        lengths = [len(ids) for ids in kwargs["completion_ids"]]
    elif tokenizer is not None:
        lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    else:
        lengths = [len(t) for t in texts]
    right = (cosine_min_len_value_correct, cosine_max_len_value_correct)
    wrong = (cosine_min_len_value_wrong, cosine_max_len_value_wrong)
    return [
        None if ok is None else cosine_value(n, cosine_max_len, *(right if ok >= 1 else wrong))
        for ok, n in zip(correct, lengths, strict=True)
    ]


def repetition_reward(
    completions: Sequence[Any],
    prompts: Sequence[Any] | None = None,
    *,
    repetition_n_grams: int = 3,
    repetition_max_penalty: float = -1.0,
    **kwargs: Any,
) -> list[float]:
    """N-gram repetition penalty (arXiv:2502.03373 App. C.2; ms-swift `RepetitionPenalty`).

    `(1 - unique_ngrams / total_ngrams) * repetition_max_penalty` over lower-cased whitespace
    words, so a value in `[repetition_max_penalty, 0]`; texts shorter than one n-gram score 0.
    """
    rewards = []
    for c in completions:
        words = completion_text(c).lower().split()
        grams = list(zip(*(words[i:] for i in range(repetition_n_grams)), strict=False))
        rewards.append(
            (1 - len(set(grams)) / len(grams)) * repetition_max_penalty if grams else 0.0
        )
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine": cosine_reward,
    "repetition": repetition_reward,
}

# The guide: "When using built-in accuracy or cosine rewards, the dataset must include a
# solution column".
_REQUIRED_COLUMNS = {"accuracy": frozenset({"solution"}), "cosine": frozenset({"solution"})}


def required_columns(name: str) -> set[str]:
    """Dataset columns a built-in reward needs; empty for the other built-ins and for plugins."""
    return set(_REQUIRED_COLUMNS.get(name, ()))
