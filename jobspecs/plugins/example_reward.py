"""Example reward plugins for `task.reward_funcs` in a GRPO job spec.

Name them relative to the job spec's folder, next to the built-ins:

    reward_funcs: [accuracy, plugins/example_reward.py:brevity]

A reward plugin is a plain function with TRL GRPOTrainer's signature: it gets `completions`
(strings, or `[{"role": "assistant", "content": ...}]` lists for chat datasets), `prompts`, and
every dataset column as a keyword list of the same length (here `solution`), plus TRL's own
keywords (`completion_ids`, `trainer_state`, ...), hence the `**kwargs`. It returns one float per
completion, or None to abstain on one. `hpcqwen render` and `submit` check the file without
running it (syntax, the function, its parameters); `submit` copies it into the run dir, imports the
copy once, and the nodes load that copy (edit this file freely after submitting). On the node, an
exception or a list of the wrong length stops the step with a message naming the plugin. The file is
copied alone: import installed packages from it, not files next to it.
"""

from __future__ import annotations

import re
from typing import Any

from hpcqwen.rewards import completion_text  # plain text from either completion form

BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def brevity(completions: list[Any], target_chars: int = 400, **kwargs: Any) -> list[float]:
    """1.0 for an empty completion, falling linearly to 0.0 at `target_chars` and beyond.

    A dense signal: even a random model's completions differ in length, so the group's rewards
    differ and GRPO gets a non-zero advantage (the tiny-model CI job relies on that).
    """
    return [max(0.0, 1.0 - len(completion_text(c)) / target_chars) for c in completions]


def boxed_matches_solution(
    completions: list[Any], solution: list[str], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last `\\boxed{}` of the completion is the solution's, as text; None if the
    solution has no box (the sample is then left to the other rewards)."""
    rewards: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        gold = BOXED.findall(sol)
        pred = BOXED.findall(completion_text(completion))
        if not gold:
            rewards.append(None)
        else:
            rewards.append(
                1.0 if pred and pred[-1].replace(" ", "") == gold[-1].replace(" ", "") else 0.0
            )
    return rewards
