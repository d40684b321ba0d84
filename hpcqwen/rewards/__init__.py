"""GRPO reward functions: the built-ins and user plugins, in TRL's reward-function signature.

`resolve_rewards(task.reward_funcs, spec_dir)` gives `(name, fn)` pairs; the GRPO runner hands
`trl_reward(name, fn)` to GRPOTrainer, and the spec validator calls `check_reward` per entry.
"""

from __future__ import annotations

from hpcqwen.rewards.builtin import (
    BUILTIN_REWARDS,
    accuracy_reward,
    completion_text,
    cosine_reward,
    format_reward,
    repetition_reward,
    required_columns,
)
from hpcqwen.rewards.plugins import (
    RewardError,
    RewardOptions,
    call_reward,
    check_reward,
    is_plugin_ref,
    load_reward,
    resolve_rewards,
    trl_reward,
)

__all__ = [
    "BUILTIN_REWARDS",
    "RewardError",
    "RewardOptions",
    "accuracy_reward",
    "call_reward",
    "check_reward",
    "completion_text",
    "cosine_reward",
    "format_reward",
    "is_plugin_ref",
    "load_reward",
    "repetition_reward",
    "required_columns",
    "resolve_rewards",
    "trl_reward",
]
