"""The `accuracy` rule on many cases (real math-verify): delimited and bare golds, fractions, roots,
equations, intervals, percentages, text answers, several boxes, no answer.

Each case is (solution, completion, expected reward), derived from the rule in
hpcqwen.rewards.answers: the gold is parsed whole; the completion's answer is its last box (or
<answer>, or anchored LaTeX) after </think>; a gold that cannot be parsed whole gives None.
"""

from __future__ import annotations

import warnings

import pytest
import sympy

from hpcqwen.rewards import accuracy_reward, builtin
from hpcqwen.rewards.answers import answer_text, covers, is_text_answer, last_boxed, parse_gold

B = r"\boxed"
CASES: list[tuple[str, str, float | None]] = [
    # --- bare golds, parsed whole (math-verify's default read 1+2x as 1, y=2x+1 as 2, ...) ---
    ("1+2x", rf"{B}{{2x+1}}", 1.0),
    ("1+2x", rf"{B}{{1 + 2x}}", 1.0),
    ("1+2x", rf"{B}{{1}}", 0.0),
    ("1+2x", rf"{B}{{2x}}", 0.0),
    ("y=2x+1", rf"{B}{{y = 2x + 1}}", 1.0),
    ("y=2x+1", rf"{B}{{2x+1}}", 1.0),  # an equation gold is compared by its right-hand side
    ("y=2x+1", rf"{B}{{2}}", 0.0),
    ("y=2x+1", rf"{B}{{y=2x-1}}", 0.0),
    (r"\frac{\sqrt 3}{2}", rf"{B}{{\frac{{\sqrt{{3}}}}{{2}}}}", 1.0),
    (r"\frac{\sqrt 3}{2}", rf"{B}{{\frac{{\sqrt 3}}{{2}}}}", 1.0),
    (r"\frac{\sqrt 3}{2}", rf"{B}{{3}}", 0.0),
    (r"\frac{\sqrt 3}{2}", rf"{B}{{\frac{{3}}{{2}}}}", 0.0),
    (r"2\sqrt 5", rf"{B}{{\sqrt{{20}}}}", 1.0),
    (r"2\sqrt 5", rf"{B}{{5}}", 0.0),
    ("x^2-1", rf"{B}{{(x-1)(x+1)}}", 1.0),
    ("x^2-1", rf"{B}{{x^2+1}}", 0.0),
    ("10^{3}", rf"{B}{{1000}}", 1.0),
    ("10^{3}", rf"{B}{{10}}", 0.0),
    ("1{,}000", rf"{B}{{1000}}", 1.0),
    ("1{,}000", rf"{B}{{1}}", 0.0),
    ("-7", rf"{B}{{-7}}", 1.0),
    ("-7", rf"{B}{{7}}", 0.0),
    ("42", rf"So the answer is {B}{{42}}.", 1.0),
    ("42", rf"{B}{{24}}", 0.0),
    (r"\pi/2", rf"{B}{{\frac{{\pi}}{{2}}}}", 1.0),
    (r"\pi/2", rf"{B}{{\pi}}", 0.0),
    # --- fractions and decimals ---
    ("3/4", rf"{B}{{0.75}}", 1.0),
    ("3/4", rf"{B}{{\frac{{6}}{{8}}}}", 1.0),
    ("3/4", rf"{B}{{4/3}}", 0.0),
    ("0.5", rf"{B}{{\frac{{1}}{{2}}}}", 1.0),
    ("0.5", rf"{B}{{\dfrac12}}", 1.0),
    ("0.5", rf"{B}{{0.05}}", 0.0),
    (r"\frac{7}{3}", rf"{B}{{2\frac{{1}}{{3}}}}", 1.0),  # math-verify reads a mixed number as 2 + 1/3
    (r"\frac{7}{3}", rf"{B}{{\frac{{14}}{{6}}}}", 1.0),
    # --- square roots ---
    (r"\sqrt{2}", rf"{B}{{\frac{{2}}{{\sqrt{{2}}}}}}", 1.0),
    (r"\sqrt{2}", rf"{B}{{2}}", 0.0),
    (r"3\sqrt{3}", rf"{B}{{\sqrt{{27}}}}", 1.0),
    (r"3\sqrt{3}", rf"{B}{{3}}", 0.0),
    # --- equations ---
    ("x=3", rf"{B}{{3}}", 1.0),
    ("x=3", rf"{B}{{x = 3}}", 1.0),
    ("x=3", rf"{B}{{x=4}}", 0.0),
    ("$x = -2$", rf"{B}{{x=-2}}", 1.0),
    ("$x = -2$", rf"{B}{{2}}", 0.0),
    # --- intervals ---
    ("[1, 3)", rf"{B}{{[1,3)}}", 1.0),
    ("[1, 3)", rf"{B}{{(1,3)}}", 0.0),
    ("[1, 3)", rf"{B}{{3}}", 0.0),
    (r"(-\infty, 2]", rf"{B}{{(-\infty,2]}}", 1.0),
    (r"(-\infty, 2]", rf"{B}{{(-\infty,2)}}", 0.0),
    (r"x \in [1,3)", rf"{B}{{[1,3)}}", 1.0),
    # --- percentages (math-verify: 50% also equals 0.5 and 50) ---
    (r"50\%", rf"{B}{{50\%}}", 1.0),
    (r"50\%", rf"{B}{{0.5}}", 1.0),
    (r"50\%", rf"{B}{{50}}", 1.0),
    (r"50\%", rf"{B}{{5\%}}", 0.0),
    (r"12.5\%", rf"{B}{{12.5\%}}", 1.0),
    (r"12.5\%", rf"{B}{{25\%}}", 0.0),
    # --- sets and several values ---
    ("1,2", rf"{B}{{2, 1}}", 1.0),
    ("1,2", rf"{B}{{1}}", 0.0),
    (r"\{1,2\}", rf"{B}{{\{{2,1\}}}}", 1.0),
    # --- delimited golds: worked solutions, single spans, answer tags ---
    (r"Half of it: $\boxed{\frac{1}{2}}$.", rf"{B}{{0.5}}", 1.0),
    (r"Half of it: $\boxed{\frac{1}{2}}$.", rf"{B}{{0.25}}", 0.0),
    (r"First $3$, then $\boxed{5}$.", rf"{B}{{5}}", 1.0),
    (r"First $3$, then $\boxed{5}$.", rf"{B}{{3}}", 0.0),
    (r"$\frac{1}{4}$", rf"{B}{{0.25}}", 1.0),
    (r"\(\frac{1}{4}\)", rf"{B}{{0.25}}", 1.0),
    (r"\[2^{10}\]", rf"{B}{{1024}}", 1.0),
    (r"$$2^{10}$$", rf"{B}{{1024}}", 1.0),
    ("<answer>17</answer>", rf"{B}{{17}}", 1.0),
    ("<answer>17</answer>", rf"{B}{{71}}", 0.0),
    (r"So $x=2$ and hence the area is $8$.", r"The final answer is $8$", 1.0),  # math-verify: the last span
    (r"So $x=2$ and hence the area is $8$.", r"The final answer is $2$", 0.0),
    (r"Boxed twice: $\boxed{3}$, corrected to $\boxed{5}$.", rf"{B}{{5}}", 1.0),  # the gold's last box
    # --- several boxes in the completion: the LAST one is the answer ---
    ("5", rf"First {B}{{3}} ... no, {B}{{5}}", 1.0),
    ("5", rf"{B}{{5}} ... no, {B}{{3}}", 0.0),
    ("3", rf"First {B}{{3}} ... no, {B}{{5}}", 0.0),
    ("5", rf"{B}{{5}} and {B}{{5}}", 1.0),
    ("1,2", rf"{B}{{1}} and {B}{{2}}", 0.0),  # not read as the set {1, 2}
    ("5", rf"<think>{B}{{5}}</think> so {B}{{3}} then {B}{{5}}", 1.0),
    ("5", rf"<think>{B}{{3}} {B}{{5}}</think> {B}{{3}}", 0.0),
    (r"\frac{1}{2}", rf"{B}{{\frac{{1}}{{\boxed{{2}}}}}}", 0.0),  # nested: the outer box, 1/box(2)? not 1/2
    # --- anchors, answer tags and no answer ---
    ("7", r"The final answer is $7$.", 1.0),
    ("7", r"the answer is $7$", 1.0),
    ("7", "The final answer is 7", 0.0),  # LaTeX is required without a box (open-r1)
    ("7", "<think>seven</think><answer>7</answer>", 1.0),
    ("7", "<think>seven</think><answer>8</answer>", 0.0),
    ("7", "", 0.0),
    ("7", "I do not know.", 0.0),
    ("7", rf"<think>it is {B}{{7}} I guess", 0.0),  # truncated inside <think>: no final answer
    ("7", rf"<think>maybe {B}{{8}}</think> {B}{{7}}", 1.0),
    # --- text answers: compared as text, never as a product of symbols ---
    ("Paris", rf"{B}{{Paris}}", 1.0),
    ("Paris", rf"{B}{{\text{{paris}}}}", 1.0),
    ("Paris", "The answer is Paris.", 1.0),
    ("Paris", "Paris", 1.0),
    ("Paris", rf"{B}{{Sirap}}", 0.0),  # a*i*p*r*s = a*i*p*r*s for math-verify, not for text
    ("Paris", rf"{B}{{Rome}}", 0.0),
    (r"\text{even}", rf"{B}{{even}}", 1.0),
    (r"\text{even}", rf"{B}{{odd}}", 0.0),
    ("New York", rf"{B}{{new york}}", 1.0),
    ("New York", rf"{B}{{York}}", 0.0),
    (r"\text{(B)}", rf"{B}{{B}}", 1.0),
    (r"\text{(B)}", rf"{B}{{C}}", 0.0),
    ("yes", "<answer>Yes</answer>", 1.0),
    ("yes", "<answer>no</answer>", 0.0),
    # --- golds that cannot be parsed whole give no opinion ---
    ("It is blue because the sky scatters the short wavelengths of sunlight.", rf"{B}{{blue}}", None),
    ("", rf"{B}{{1}}", None),
    (r"$\frac{1}{$", rf"{B}{{1}}", None),
]


@pytest.mark.parametrize(("solution", "completion", "expected"), CASES)
def test_accuracy_case(solution: str, completion: str, expected: float | None) -> None:
    assert accuracy_reward([completion], solution=[solution]) == [expected]


def test_there_are_many_cases() -> None:
    assert len(CASES) >= 90


@pytest.mark.parametrize(
    ("solution", "answer"),
    [("1+2x", "1+2x"), (r"So $\boxed{\frac12}$.", r"\frac12"), (r"$x$", "x"), (r"\(y\)", "y"),
     (r"a $1$ b $2$", None), ("<answer>4</answer>", "4"), (r"\boxed{a{b}c} and \boxed{d}", "d"),
     ("x" * 200, None), ("line one\nline two", None)],
)
def test_answer_text_follows_the_documented_order(solution: str, answer: str | None) -> None:
    assert answer_text(solution) == answer


def test_the_gold_is_never_read_as_a_part_of_itself() -> None:
    assert not covers([1, "1"], "1+2x")  # what math-verify's unanchored default made of 1+2x
    assert not covers([3, "3"], "[1, 3)") and not covers([2, "2"], r"y=2x+1")
    assert covers([15, "15"], r"15\text{ cm}") and covers([45, "45"], r"45^\circ")  # units, degrees
    assert covers([sympy.Rational(1, 2), r"\frac{1}{2}"], "0.5") and not covers([r"\frac{1}{"], r"\frac{1}{")
    gold = parse_gold("1+2x", None)
    assert gold is not None and gold.math is not None and str(gold.math[0]) == "2*x + 1"


def test_text_answers_and_formulas_are_told_apart() -> None:
    assert is_text_answer("Paris") and is_text_answer(r"\text{even}") and is_text_answer("New York")
    assert not is_text_answer(r"\frac{\sqrt 3}{2}") and not is_text_answer("y=2x+1")
    assert not is_text_answer(r"\sin(x)+\log 2") and not is_text_answer("sin x") and not is_text_answer("B")
    assert last_boxed(r"\boxed{\frac{1}{2}} x \fbox{3}") == "3" and last_boxed("none") is None


def test_a_large_share_of_unparseable_golds_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "_warned_golds", False)
    monkeypatch.setattr(builtin, "_golds", {"seen": 0, "failed": 0})
    monkeypatch.delenv("RANK", raising=False)
    prose = "Because the sky scatters the short wavelengths of sunlight it looks blue to us."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accuracy_reward([r"\boxed{1}"] * 6, solution=["1"] * 6)
        assert not caught  # parsed golds never warn
        accuracy_reward([r"\boxed{1}"] * 8, solution=[prose] * 8)
        accuracy_reward([r"\boxed{1}"] * 8, solution=[prose] * 8)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "could not be parsed whole" in messages[0] and "of 10 solutions" in messages[0]
