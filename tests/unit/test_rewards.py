"""Built-in GRPO rewards and reward plugins, on hand-made NuminaMath-style solutions.

Expected values are derived in the comments from the documented semantics (math-verify's
equivalence, ms-swift's cosine and repetition formulas), not copied from a run.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from hpcqwen.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    RewardOptions,
    accuracy_reward,
    builtin,
    call_reward,
    check_reward,
    completion_text,
    cosine_reward,
    format_reward,
    load_reward,
    repetition_reward,
    required_columns,
    resolve_rewards,
    trl_reward,
)

REPO = Path(__file__).resolve().parents[2]
JOBSPECS = REPO / "jobspecs"

# NuminaMath-TIR style: worked solution in LaTeX, final answer boxed.
HALF = r"Each of the two equal parts is $\frac{1}{2}$ of the whole, so $\boxed{\frac{1}{2}}$."
TWO = r"Dividing both sides by $3$ gives $\boxed{2}$."
X3 = r"Subtracting $4$ and dividing by $2$, we get $\boxed{x=3}$."
ROOT = r"The hypotenuse is $\sqrt{2^2+4^2}=\sqrt{20}$, that is $\boxed{2\sqrt{5}}$."


def acc(completion: Any, solution: str) -> float | None:
    return accuracy_reward([completion], solution=[solution])[0]


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "completion"),
    [
        (HALF, r"<think>1 over 2</think> The answer is $\boxed{\frac{1}{2}}$."),
        (HALF, r"\boxed{0.5}"),  # \frac{1}{2} == 0.5
        (HALF, r"\boxed{1/2}"),
        (HALF, r"$\boxed{\dfrac{1}{2}}$"),  # \dfrac normalises to \frac
        (r"The answer is $\boxed{0.5}$.", r"\boxed{\frac{1}{2}}"),  # and the other way round
        (TWO, r"\boxed{2.0}"),
        (X3, r"\boxed{x=3}"),
        (X3, r"\boxed{x = 3}"),
        (X3, r"\boxed{3}"),  # the gold equation x=3 is compared by its right-hand side
        (r"So $\boxed{3}$.", r"\boxed{x=3}"),
        (ROOT, r"\boxed{\sqrt{20}}"),  # symbolic equality, not string equality
        ("42", r"So the answer is \boxed{42}."),  # a plain-number solution, no LaTeX at all
    ],
)
def test_accuracy_accepts_equivalent_forms(solution: str, completion: str) -> None:
    assert acc(completion, solution) == 1.0


@pytest.mark.parametrize(
    ("solution", "completion"),
    [
        (HALF, r"\boxed{0.6}"),
        (TWO, r"\boxed{-2}"),
        (X3, r"\boxed{x=4}"),
        (ROOT, r"\boxed{2\sqrt{3}}"),
        (TWO, ""),
        (TWO, "I do not know."),
    ],
)
def test_accuracy_rejects_wrong_answers(solution: str, completion: str) -> None:
    assert acc(completion, solution) == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # LaTeX after an answer anchor counts (math-verify's LatexExtractionConfig anchors) ...
        (r"The final answer is $\frac{1}{2}$", 1.0),
        (r"the answer is $0.5$", 1.0),
        # ... but open-r1/ms-swift require LaTeX (no plain-text numbers) and an anchor
        # (try_extract_without_anchor=False), so these unboxed answers score 0 although right.
        ("The final answer is 0.5", 0.0),
        ("0.5", 0.0),
        (r"So we get $0.5$.", 0.0),
    ],
)
def test_accuracy_unboxed_answers_follow_open_r1(completion: str, expected: float) -> None:
    assert acc(completion, HALF) == expected


def test_accuracy_grades_only_the_text_after_think() -> None:
    # The boxed guess inside <think> must not decide the reward; the final answer does. Boxes
    # outrank anchored $...$ answers, so without stripping the think block the first case
    # would grade the guess 2 instead of the final 7.
    assert acc(r"<think>maybe \boxed{2}</think> The final answer is $7$.", TWO) == 0.0
    assert acc(r"<think>maybe \boxed{7}</think> The final answer is $2$.", TWO) == 1.0
    assert acc(r"<think>maybe \boxed{2}</think> It is \boxed{7}.", TWO) == 0.0
    # Truncated inside the think block: no final answer yet.
    assert acc(r"<think>so far \boxed{2} looks right", TWO) == 0.0


def test_accuracy_prefers_boxed_over_anchored_latex() -> None:
    # boxed_match_priority=0 (open-r1/ms-swift): the box wins over a later "final answer is".
    assert acc(r"\boxed{2}. So the final answer is $5$", TWO) == 1.0


def test_accuracy_reads_answer_tags_like_ms_swift() -> None:
    # Inside <answer> the lenient default extraction applies, so a bare number counts.
    assert acc("<think>3 times 2 is 6</think><answer>2</answer>", TWO) == 1.0
    assert acc("<think>...</think><answer>5</answer>", TWO) == 0.0


def test_accuracy_handles_conversational_completions() -> None:
    right = [{"role": "assistant", "content": r"<think>2</think> \boxed{2}"}]
    wrong = [{"role": "assistant", "content": r"\boxed{3}"}]
    # TRL's Qwen3 response template moves the thinking into reasoning_content.
    split = [{"role": "assistant", "reasoning_content": r"\boxed{9}?", "content": r"\boxed{2}"}]
    assert accuracy_reward([right, wrong, split], solution=[TWO] * 3) == [1.0, 0.0, 1.0]
    assert completion_text(split).startswith("<think>\n")


def test_accuracy_skips_unparseable_solution_with_none() -> None:
    # open-r1: None lets TRL skip the sample instead of rewarding or punishing it.
    assert acc(r"\boxed{2}", "It is blue because the sky scatters the short wavelengths of sunlight.") is None


def test_accuracy_without_solution_column_names_it() -> None:
    with pytest.raises(ValueError, match=r"needs a 'solution' column .*columns passed: answer"):
        accuracy_reward(["x"], answer=["2"], trainer_state=None, completion_ids=[[1]])
    with pytest.raises(ValueError, match=r"2 'solution' values for 1 completions"):
        accuracy_reward(["x"], solution=[TWO, TWO])


def test_accuracy_timeout_works_in_main_thread() -> None:
    # 9^(9^(9^9)) keeps sympy's comparison busy for far longer than a second; the signal.alarm
    # timeout must cut it and score 0. A subprocess, so that a broken timeout fails the test
    # instead of hanging the session.
    code = (
        "from hpcqwen.rewards import builtin\n"
        "builtin.MATH_VERIFY_TIMEOUT_S = 1\n"
        "print(builtin.accuracy_reward([r'\\boxed{9^{9^{9^{9}}}}'], solution=['2']))\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[0.0]"
    assert time.monotonic() - start < 30


def test_accuracy_outside_main_thread_runs_without_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # math-verify raises ValueError for signal.alarm outside the main thread; we must not.
    monkeypatch.setattr(builtin, "_warned_no_timeout", False)
    out: dict[str, Any] = {}

    def work() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["rewards"] = accuracy_reward([r"\boxed{0.5}", r"\boxed{3}"], solution=[HALF] * 2)
            out["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert out["rewards"] == [1.0, 0.0]
    assert any("without a time limit" in w for w in out["warnings"])


def test_every_math_tiny_row_grades_its_own_answer() -> None:
    rows = [json.loads(line) for line in (JOBSPECS / "data" / "math-tiny.jsonl").open()]
    assert len(rows) >= 40
    for row in rows:
        assert set(row) == {"problem", "solution", "messages"}
        assert row["messages"] == [{"role": "user", "content": row["problem"]}]
    solutions = [row["solution"] for row in rows]
    answers = [_last_boxed(s) for s in solutions]
    assert accuracy_reward([rf"\boxed{{{a}}}" for a in answers], solution=solutions) == [1.0] * len(
        rows
    )
    assert accuracy_reward([r"\boxed{1000003}"] * len(rows), solution=solutions) == [0.0] * len(
        rows
    )


def _last_boxed(text: str) -> str:
    start = text.rindex(r"\boxed{") + len(r"\boxed{")
    depth, end = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    return text[start : end - 1]


# --- format -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4.", 1.0),
        ("<think></think>4", 1.0),  # ms-swift's .*? accepts an empty think block
        ("<think>a</think><answer>4</answer>", 1.0),
        ("The answer is 4.", 0.0),  # no think block
        ("<think>a</think>   \n", 0.0),  # no answer after it
        ("<think>a</think><answer> </answer>", 0.0),  # an empty answer tag is no answer
        ("Sure. <think>a</think> 4", 0.0),  # must start with <think>
        ("<think>a, still thinking", 0.0),  # never closed
        ("<think>a</think> 4 <think>b</think> 5", 0.0),  # a second think block
        ("<think>a<think>b</think> 4", 0.0),  # nested opening tag
    ],
)
def test_format(completion: str, expected: float) -> None:
    assert format_reward([completion]) == [expected]
    assert format_reward([[{"role": "assistant", "content": completion}]]) == [expected]


def test_format_accepts_parsed_reasoning_content() -> None:
    msg = [{"role": "assistant", "reasoning_content": "2 + 2", "content": "4"}]
    assert format_reward([msg]) == [1.0]


# --- cosine -----------------------------------------------------------------------------------


def cos(completion: str, n_tokens: int, **params: Any) -> float | None:
    return cosine_reward([completion], solution=[TWO], completion_ids=[[0] * n_tokens], **params)[0]


RIGHT, WRONG = r"\boxed{2}", r"\boxed{3}"


def test_cosine_prefers_short_right_and_long_wrong() -> None:
    assert cos(RIGHT, 100) > cos(RIGHT, 800) > cos(WRONG, 800) > cos(WRONG, 100)  # type: ignore[operator]


def test_cosine_endpoints_are_ms_swift_defaults() -> None:
    # ms-swift: correct 1.0 -> 0.5, wrong -0.5 -> 0.0 over cosine_max_len (1000 here).
    assert cos(RIGHT, 0) == pytest.approx(1.0)
    assert cos(RIGHT, 1000) == pytest.approx(0.5)
    assert cos(WRONG, 0) == pytest.approx(-0.5)
    assert cos(WRONG, 1000) == pytest.approx(0.0)
    # Halfway cos(pi/2) = 0, so the midpoint of the two endpoints.
    assert cos(RIGHT, 500) == pytest.approx(0.75)
    assert cos(WRONG, 500) == pytest.approx(-0.25)
    # Past max_len the value stays at the endpoint (the raw cosine would climb back).
    assert cos(RIGHT, 1700) == pytest.approx(0.5)


def test_cosine_length_source() -> None:
    text = r"\boxed{2} " + "word " * 99  # 100 whitespace tokens, 506 characters
    ids = cosine_reward([text], solution=[TWO], completion_ids=[[0] * 10])[0]
    chars = cosine_reward([text], solution=[TWO])[0]

    class Words:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [0] * len(text.split())

    words = cosine_reward([text], solution=[TWO], tokenizer=Words())[0]
    expected = {n: 0.75 + 0.25 * math.cos(n * math.pi / 1000) for n in (10, len(text), 100)}
    assert (ids, chars, words) == pytest.approx((expected[10], expected[len(text)], expected[100]))


def test_cosine_options_and_unparseable_solution() -> None:
    fn = RewardOptions(cosine_max_len=10, cosine_max_len_value_correct=0.0).bind("cosine")
    assert fn([RIGHT], solution=[TWO], completion_ids=[[0] * 10]) == [pytest.approx(0.0)]
    prose = "The sky is blue because air scatters the short wavelengths of sunlight."
    assert cosine_reward([RIGHT], solution=[prose], completion_ids=[[0]]) == [None]


# --- repetition -------------------------------------------------------------------------------


def test_repetition() -> None:
    fresh = "every word in this sentence appears exactly once"
    looped = "the cat sat " * 10  # 30 words, 28 trigrams, 3 distinct: (1 - 3/28) * -1
    mixed_case = "A b c a B C"  # lower-cased: 4 trigrams, 3 distinct: (1 - 3/4) * -1
    rewards = repetition_reward([fresh, looped, mixed_case, "too short", ""])
    assert rewards == pytest.approx([0.0, -(1 - 3 / 28), -0.25, 0.0, 0.0])
    assert rewards[1] < -0.85  # heavy repetition is near the -1.0 maximum penalty


def test_repetition_options() -> None:
    fn = RewardOptions(repetition_n_grams=1, repetition_max_penalty=-2.0).bind("repetition")
    assert fn(["a a a b"]) == pytest.approx([-2.0 * (1 - 2 / 4)])  # unigrams: 2 distinct of 4
    with pytest.raises(ValueError, match="repetition_max_penalty must be <= 0"):
        RewardOptions(repetition_max_penalty=0.5)
    with pytest.raises(ValueError, match="cosine_max_len must be > 0"):
        RewardOptions(cosine_max_len=0)


def test_builtin_table() -> None:
    assert set(BUILTIN_REWARDS) == {"accuracy", "format", "cosine", "repetition"}
    assert required_columns("accuracy") == required_columns("cosine") == {"solution"}
    assert required_columns("format") == required_columns("repetition") == set()


# --- plugins ----------------------------------------------------------------------------------


def write(tmp_path: Path, body: str, name: str = "plug.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD = "def reward(completions, **kwargs):\n    return [1.0 for _ in completions]\n"


def test_check_builtins_and_unknown_names(tmp_path: Path) -> None:
    assert all(check_reward(name, tmp_path) == [] for name in BUILTIN_REWARDS)
    (problem,) = check_reward("acuracy", tmp_path)
    assert "unknown built-in reward 'acuracy' (did you mean 'accuracy'?)" in problem


@pytest.mark.parametrize(
    ("body", "ref", "expected"),
    [
        (None, "missing.py:reward", "file {tmp}/missing.py does not exist"),
        ("x = 1\n\ndef reward(completions, **kw)\n    pass\n", "plug.py:reward", "plug.py:3: "),
        (GOOD, "plug.py:rewrd", "has no function 'rewrd'; did you mean 'reward'?"),
        ("reward = 3\n", "plug.py:reward", "names a int, not a function"),
        ("class reward:\n    pass\n", "plug.py:reward", "'reward' is a class"),
        ("def reward(completions):\n    return []\n", "plug.py:reward", "has no **kwargs"),
        ("def reward(texts, **kw):\n    return []\n", "plug.py:reward", None),  # via **kw
        ("def reward(completions, /, **kw):\n    return []\n", "plug.py:reward", "positional-only"),
        ("import no_such_module_xyz\n", "plug.py:reward", "ModuleNotFoundError"),
        (GOOD, "plug.py:", "is not of the form path/to/file.py:function"),
        (None, "no_such_pkg_xyz.mod:reward", "importing no_such_pkg_xyz.mod failed"),
    ],
)
def test_check_plugin_problems(
    tmp_path: Path, body: str | None, ref: str, expected: str | None
) -> None:
    if body is not None:
        write(tmp_path, body)
    problems = check_reward(ref, tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert expected.format(tmp=tmp_path) in problems[0]


def test_no_kwargs_and_no_completions_reports_both(tmp_path: Path) -> None:
    write(tmp_path, "def reward(texts):\n    return []\n")
    problems = check_reward("plug.py:reward", tmp_path)
    assert any("no **kwargs" in p for p in problems)
    assert any("no 'completions' parameter" in p for p in problems)


def test_required_parameters_checked_against_columns(tmp_path: Path) -> None:
    write(tmp_path, "def reward(completions, prompts, solution, **kw):\n    return []\n")
    assert check_reward("plug.py:reward", tmp_path) == []  # columns unknown: not checked
    assert check_reward("plug.py:reward", tmp_path, columns=["solution"]) == []
    (problem,) = check_reward("plug.py:reward", tmp_path, columns=["problem"])
    assert problem == "required parameter 'solution' is not a dataset column"


def test_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert check_reward("plug.py:reward", tmp_path) == []
    assert check_reward(f"{path}:reward", REPO) == []  # absolute path ignores base_dir
    assert check_reward("plug.py:reward", REPO) != []
    assert check_reward("hpcqwen.rewards.builtin:format_reward", tmp_path) == []


def test_load_reward_raises_with_ref_and_problem(tmp_path: Path) -> None:
    write(tmp_path, "reward = 3\n")
    with pytest.raises(RewardError, match=r"reward plugin 'plug.py:reward': .*not a function"):
        load_reward("plug.py:reward", tmp_path)


def test_example_plugin_loads_and_scores() -> None:
    for name in ("brevity", "boxed_matches_solution"):
        assert check_reward(f"plugins/example_reward.py:{name}", JOBSPECS) == []
    brevity = load_reward("plugins/example_reward.py:brevity", JOBSPECS)
    assert brevity(["", "x" * 200, "x" * 900]) == [1.0, 0.5, 0.0]
    boxed = load_reward("plugins/example_reward.py:boxed_matches_solution", JOBSPECS)
    assert boxed([r"\boxed{2}", r"\boxed{3}", "x"], solution=[TWO, TWO, "none"]) == [1.0, 0.0, None]


def test_resolve_rewards(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    names = ["accuracy", "cosine", "plug.py:reward"]
    resolved = resolve_rewards(names, tmp_path, RewardOptions(cosine_max_len=4))
    assert [n for n, _ in resolved] == names
    assert resolved[0][1] is accuracy_reward
    assert resolved[1][1]([RIGHT], solution=[TWO], completion_ids=[[0] * 4]) == [pytest.approx(0.5)]
    assert resolved[2][1](["a", "b"]) == [1.0, 1.0]
    with pytest.raises(RewardError, match="did you mean 'format'"):
        resolve_rewards(["formt"], tmp_path)


# --- call_reward ------------------------------------------------------------------------------


def test_call_reward_passes_columns_and_keeps_none() -> None:
    def plugin(
        completions: list[str], prompts: list[str], solution: list[str], **kw: Any
    ) -> list[Any]:
        return [
            None if s is None else float(len(p + c + s))
            for c, p, s in zip(completions, prompts, solution, strict=True)
        ]

    assert call_reward("p", plugin, ["ab", "c"], ["x", "y"], {"solution": ["s", None]}) == [
        4.0,
        None,
    ]


def test_call_reward_accepts_arrays() -> None:
    import numpy as np  # TRL builds a tensor from whatever sized container comes back

    out = call_reward("p", lambda completions, **kw: np.array([0.5, 1]), ["a", "b"], None, {})
    assert out == [0.5, 1.0]
    assert all(type(r) is float for r in out)


def test_call_reward_wrong_length_names_plugin() -> None:
    with pytest.raises(RewardError) as err:
        call_reward("plugins/r.py:short", lambda completions, **kw: [1.0], ["a", "b"], None, {})
    assert err.value.message == (
        "reward function 'plugins/r.py:short' returned 1 rewards, expected 2 (one per completion)"
    )


def test_call_reward_exception_names_plugin() -> None:
    def broken(completions: list[str], **kw: Any) -> list[float]:
        return [1 / 0 for _ in completions]

    with pytest.raises(
        RewardError, match=r"'plugins/r.py:broken' raised ZeroDivisionError: division by zero"
    ) as err:
        call_reward("plugins/r.py:broken", broken, ["a"], None, {})
    assert isinstance(err.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("returned", "expected"),
    [(0.5, "returned a float, expected a list"), (["high"], "returned 'high' (str) at index 0")],
)
def test_call_reward_rejects_non_numbers(returned: Any, expected: str) -> None:
    with pytest.raises(RewardError, match=re.escape(expected)):
        call_reward("p", lambda completions, **kw: returned, ["a"], None, {})


def test_async_plugin_and_trl_wrapper() -> None:
    async def later(completions: list[str], **kw: Any) -> list[float]:
        return [2.0 for _ in completions]

    assert call_reward("later", later, ["a"], None, {}) == [2.0]
    wrapped = trl_reward("plugins/x.py:later", later)
    assert wrapped.__name__ == "later"  # TRL logs rewards/<__name__>/mean
    assert wrapped(completions=["a", "b"], prompts=None, trainer_state=None) == [2.0, 2.0]
    assert trl_reward("accuracy", accuracy_reward).__name__ == "accuracy"
    with pytest.raises(RewardError, match="'plugins/x.py:short' returned 0 rewards"):
        trl_reward("plugins/x.py:short", lambda completions, **kw: [])(completions=["a"])
