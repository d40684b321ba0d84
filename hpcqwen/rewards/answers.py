"""Which answer a solution and a completion give, and whether they are the same (the `accuracy` rule).

The gold answer, from the `solution` column, in this order:
1. the content of `<answer>...</answer>` when there is one (ms-swift), then of that:
2. the last `\\boxed{}` (or `\\fbox{}`), else
3. the one `$...$`, `\\(...\\)` or `\\[...\\]` span when that is all there is, else
4. the whole text when it has no LaTeX delimiters and is short (a bare answer: `1+2x`,
   `y=2x+1`, `\\frac{\\sqrt 3}{2}`, `[1, 3)`, `50\\%`, `Paris`), else
5. a worked solution without a box: math-verify's LaTeX extraction over its delimited spans
   (no numbers guessed from prose); math-verify picks the span (the last one).
Cases 1-4 give an answer text that is parsed whole, as one math span, so `1+2x` is never read as
`1`; a parse that covers less than the text (`1` of `1+2x`), or yields no mathematics, counts as
not parsed. An answer text
made of words (`Paris`, `\\text{even}`) is a text answer, compared as normalised text, never as a
product of symbols. A gold that cannot be parsed gives no reward (None).

The completion's answer: only what follows the last `</think>` is graded; in it `<answer>...</answer>`
when present, else the LAST `\\boxed{}` (several boxes are not read as a set: graders take the
last one), else LaTeX after an anchor such as "the answer is" (open-r1, ms-swift). A text answer
is read from the same places, or from "answer is ..." / a short final line.
Equal means math-verify's `verify` (symbolic: `\\frac{1}{2}` = `0.5`, `x=3` = `3`, `50\\%` = `0.5`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SPAN = re.compile(r"^\s*(?:\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\])\s*[.]?\s*$", re.DOTALL)
_DELIMITERS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")
# Words that are mathematics, not text, when they appear without a backslash.
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "lim", "max", "min", "gcd",
               "lcm", "mod", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "infty", "inf", "frac",
               "dfrac", "tfrac", "cdot", "times", "circ", "cup", "cap", "pm", "mp", "leq", "geq", "neq"}
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|textit)\s*\{([^{}]*)\}")
_ANCHOR = re.compile(r"answer\s*(?:is|:)\s*(.+)", re.IGNORECASE | re.DOTALL)
BARE_MAX_CHARS = 80  # longer text without LaTeX delimiters is prose, not a bare answer
BARE_MAX_WORDS = 4  # a text answer has at most this many words


@dataclass(frozen=True)
class Gold:
    """A parsed gold answer: a math-verify parse, or a normalised text answer."""

    math: list[Any] | None = None
    text: str | None = None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces), or None."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def answer_text(solution: str) -> str | None:
    """The gold's answer text by rules 1-4 of the module docstring; None for a worked solution (5)."""
    tag = _ANSWER_TAG.search(solution)
    text = tag.group(1).strip() if tag else solution.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    span = _SPAN.match(text)
    if span and sum(text.count(d) for d in ("$", "\\(", "\\[")) <= 2 + text.count("$$"):
        return next(g for g in span.groups() if g is not None).strip()
    if not any(d in text for d in _DELIMITERS) and len(text) <= BARE_MAX_CHARS and "\n" not in text:
        return text.rstrip(".").strip()
    return None


def is_text_answer(answer: str) -> bool:
    """An answer made of words (`Paris`, `\\text{even}`), not a formula of one-letter variables."""
    unwrapped = _TEXT_WRAPPER.sub(r" \1 ", answer)
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(unwrapped))


def normalize_text(answer: str) -> str:
    """Lower case, LaTeX text wrappers and `$` removed, surrounding punctuation and articles dropped."""
    text = _TEXT_WRAPPER.sub(r"\1", answer).replace("$", "").lower()
    text = re.sub(r"\s+", " ", text).strip(" .,;:!?\"'()")
    return re.sub(r"^(the|a|an) ", "", text)


def _core(latex: str) -> str:
    """The characters that carry a value: no spaces, units, degree signs, `$` or `{,}`."""
    text = _TEXT_WRAPPER.sub("", latex).replace("{,}", ",")
    for piece in ("^\\circ", "^{\\circ}", "\\%", "%", "\\$", "$", "\\!", "\\,", "\\left", "\\right", " "):
        text = text.replace(piece, "")
    return text


def covers(parsed: list[Any], answer: str) -> bool:
    """False when the parse read only part of the answer text (`1` of `1+2x`, `3` of `[1, 3)`)."""
    if len(parsed) < 2 or isinstance(parsed[0], str):
        return False  # math-verify found only a string it could not turn into mathematics
    extracted, target = _core(str(parsed[-1])), _core(answer)
    return not (len(extracted) < len(target) and extracted in target)


@lru_cache(maxsize=4096)  # a solution is graded once per generation: parse it once
def parse_gold(solution: str, timeout_s: int | None) -> Gold | None:
    """The gold answer of a `solution`, or None when it cannot be parsed whole."""
    from math_verify import LatexExtractionConfig, parse  # type: ignore[import-untyped]

    answer = answer_text(solution)
    if answer is None:  # a worked solution without a box: delimited LaTeX spans only
        parsed = parse(solution, extraction_config=[LatexExtractionConfig()], extraction_mode="first_match",
                       parsing_timeout=timeout_s)
        return Gold(math=parsed) if len(parsed) == 2 and not isinstance(parsed[0], str) else None
    if is_text_answer(answer):
        words = normalize_text(answer).split()
        return Gold(text=" ".join(words)) if 0 < len(words) <= BARE_MAX_WORDS else None
    parsed = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], extraction_mode="first_match",
                   parsing_timeout=timeout_s)
    return Gold(math=parsed) if parsed and covers(parsed, answer) else None


def predicted_text(region: str) -> str | None:
    """A completion's text answer: `<answer>`, the last box, "answer is ...", or a short last line."""
    tag = _ANSWER_TAG.search(region)
    if tag:
        return tag.group(1)
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed
    anchor = _ANCHOR.search(region)
    if anchor:
        return anchor.group(1).strip().splitlines()[0]
    lines = region.strip().splitlines()
    return lines[-1] if lines and len(lines[-1].split()) <= BARE_MAX_WORDS else None


def parse_prediction(region: str, timeout_s: int | None) -> list[Any]:
    """A completion's math answer (see the module docstring), parsed by math-verify."""
    from latex2sympy2_extended import NormalizationConfig  # type: ignore[import-untyped]
    from math_verify import LatexExtractionConfig, parse

    tag = _ANSWER_TAG.search(region)
    if tag:  # ms-swift: a tagged answer is parsed with the lenient default extraction
        return list(parse(tag.group(1).strip(), extraction_mode="first_match", parsing_timeout=timeout_s))
    boxed = last_boxed(region)
    # open-r1/ms-swift: LaTeX only, \boxed{} first, no unanchored guesses; unlike them, TeX's own
    # short forms (`\frac12`, `\sqrt 3`) are read as TeX reads them (malformed_operators), as the
    # gold's are. boxed="all" is the typed value (ms-swift passes True); `equations` is deprecated.
    norm = NormalizationConfig(nits=False, malformed_operators=True, basic_latex=True, boxed="all", units=True)
    config = LatexExtractionConfig(normalization_config=norm, boxed_match_priority=0,
                                   try_extract_without_anchor=False)
    text = region if boxed is None else "\\boxed{" + boxed + "}"  # the last box only, never a set of them
    return list(parse(text, extraction_config=[config], extraction_mode="first_match", parsing_timeout=timeout_s))


def grade(region: str, gold: Gold, timeout_s: int | None) -> float:
    """1.0 when the completion's final-answer region gives the gold answer, else 0.0."""
    from math_verify import verify

    if gold.text is not None:
        said = predicted_text(region)
        return float(said is not None and normalize_text(said) == gold.text)
    try:
        return float(verify(gold.math, parse_prediction(region, timeout_s), timeout_seconds=timeout_s))
    except Exception:  # ms-swift: a prediction that crashes the verifier scores 0
        return 0.0
