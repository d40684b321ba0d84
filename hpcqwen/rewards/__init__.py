"""GRPO reward functions: the built-ins and user plugins, in TRL's reward-function signature.

`resolve_rewards(task.reward_funcs, spec_dir)` gives `(name, fn)` pairs; the GRPO runner hands
`trl_reward(name, fn)` to GRPOTrainer, and the spec validator calls `check_reward` per entry.

This package's names (what a reward plugin imports, e.g. `from hpcqwen.rewards import completion_text`) are
loaded from their modules on first use (PEP 562), so the package itself imports nothing: importing one of its
modules never runs another, and there is no circle between the package and its modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {  # name -> the module of this package that defines it
    "BUILTIN_REWARDS": "builtin", "accuracy_reward": "builtin", "completion_text": "builtin",
    "cosine_reward": "builtin", "format_reward": "builtin", "repetition_reward": "builtin",
    "required_columns": "builtin",
    "RewardError": "plugins", "RewardOptions": "plugins", "call_reward": "plugins", "check_reward": "plugins",
    "is_plugin_ref": "plugins", "load_reward": "plugins", "resolve_rewards": "plugins", "trl_reward": "plugins",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """One of the names above, from its module (then kept here)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value
