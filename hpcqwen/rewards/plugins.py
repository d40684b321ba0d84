"""Reward plugins: `path/to/file.py:function` or `package.module:function`, checked before sbatch.

`check_reward` reports problems as strings without raising, so the job-spec validator can list
them all at submit time; `load_reward` is what the runner calls on the node; `call_reward` turns a
plugin's exception or wrong-sized answer into a `RewardError` that names the plugin.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from hpcqwen.errors import HpcqwenError
from hpcqwen.rewards.builtin import BUILTIN_REWARDS, RewardFn

# What TRL 1.16's GRPOTrainer passes besides dataset columns (`_calculate_rewards`).
TRL_REWARD_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
)


class RewardError(HpcqwenError):
    """A reward function failed or returned something TRL cannot use."""

    reference = "reward"


@dataclass(frozen=True)
class RewardOptions:
    """Parameters of the built-in `cosine` and `repetition` rewards: ms-swift's names and defaults.

    ms-swift sets `cosine_max_len` to `max_completion_length` when it is unset; the GRPO runner
    does the same when it builds these options.

    Raises:
        ValueError: For a non-positive `cosine_max_len` or `repetition_n_grams`, or a positive
            `repetition_max_penalty` (open-r1 rejects that too).
    """

    cosine_min_len_value_wrong: float = -0.5
    cosine_max_len_value_wrong: float = 0.0
    cosine_min_len_value_correct: float = 1.0
    cosine_max_len_value_correct: float = 0.5
    cosine_max_len: int = 1000
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0

    def __post_init__(self) -> None:
        if self.cosine_max_len <= 0:
            raise ValueError(f"cosine_max_len must be > 0 (got {self.cosine_max_len})")
        if self.repetition_n_grams < 1:
            raise ValueError(f"repetition_n_grams must be >= 1 (got {self.repetition_n_grams})")
        if self.repetition_max_penalty > 0:
            raise ValueError(
                f"repetition_max_penalty must be <= 0 (got {self.repetition_max_penalty})"
            )

    def bind(self, name: str) -> RewardFn:
        """Return built-in `name` with this object's parameters that belong to it."""
        fn = BUILTIN_REWARDS[name]
        own = {k: v for k, v in asdict(self).items() if k.startswith(f"{name}_")}
        # A partial, not a closure: it pickles, and TRL names it after the wrapped function.
        return functools.partial(fn, **own) if own else fn


def is_plugin_ref(ref: str) -> bool:
    """True for `file.py:function` / `module:function`; built-in names have no colon."""
    return ":" in ref


def split_plugin_ref(ref: str, base_dir: Path) -> tuple[Path | str, str]:
    """Return (resolved file path or module name, function name); ValueError if malformed."""
    target, _, func = ref.rpartition(":")  # rpartition: an absolute Windows path keeps its drive
    if not target or not func:
        raise ValueError(
            f"{ref!r} is not of the form path/to/file.py:function or package.module:function"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        return (path if path.is_absolute() else Path(base_dir) / path), func
    return target, func


def _import_file(path: Path) -> ModuleType:
    # A unique name per path, registered in sys.modules as importlib's recipe does, so that
    # dataclasses and pickling inside the plugin find their module.
    name = (
        f"_hpcqwen_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    )
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load(ref: str, base_dir: Path) -> tuple[Any, list[str]]:
    """Import the plugin's attribute; return (object or None, problems)."""
    try:
        target, func = split_plugin_ref(ref, base_dir)
    except ValueError as e:
        return None, [str(e)]
    try:
        if isinstance(target, Path):
            if not target.is_file():
                return None, [f"file {target} does not exist"]
            module = _import_file(target)
        else:
            module = importlib.import_module(target)
    except SyntaxError as e:
        return None, [f"syntax error in {e.filename or target}:{e.lineno}: {e.msg}"]
    except Exception as e:
        return None, [f"importing {target} failed: {type(e).__name__}: {e}"]
    if not hasattr(module, func):
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(func, defined, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it defines: {', '.join(defined)}"
        return None, [f"{target} has no function {func!r}; {hint}"]
    return getattr(module, func), []


def _signature_problems(fn: Any, columns: Collection[str] | None) -> list[str]:
    name = getattr(fn, "__name__", type(fn).__name__)
    if inspect.isclass(fn):
        return [class_problem(name)]
    if not callable(fn):
        return [f"the plugin names a {type(fn).__name__}, not a function"]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []  # callables without a signature (C builtins): nothing to check
    return parameter_problems(name, params, columns)


def class_problem(name: str) -> str:
    """What is wrong with a plugin that names a class."""
    return f"{name!r} is a class; point at a function or an instance (`x = {name}()`)"


def parameter_problems(name: str, params: Sequence[inspect.Parameter], columns: Collection[str] | None) -> list[str]:
    """What TRL's keyword-only call would trip over in a reward function with these parameters."""
    problems = []
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        problems.append(
            f"{name}() has no **kwargs; TRL passes prompts, completion_ids, trainer_state and "
            "every dataset column as keyword arguments"
        )
        if all(p.name != "completions" for p in params):
            problems.append(f"{name}() has no 'completions' parameter")
    known = None if columns is None else TRL_REWARD_KWARGS | set(columns)
    for p in params:
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.POSITIONAL_ONLY:
            problems.append(f"parameter {p.name!r} is positional-only; TRL passes keywords only")
        elif known is not None and p.name not in known:
            problems.append(f"required parameter {p.name!r} is not a dataset column")
    return problems


def check_reward(
    ref: str, base_dir: str | Path, columns: Collection[str] | None = None
) -> list[str]:
    """List what is wrong with one `reward_funcs` entry, without raising.

    Args:
        ref: A built-in name or a plugin reference.
        base_dir: Directory that relative plugin paths are resolved against (the job spec's).
        columns: Dataset columns, when known; then required parameters must be among them.

    Returns:
        Problems as sentences (empty when the entry is usable); the caller adds `ref`.
    """
    if not is_plugin_ref(ref):
        if ref in BUILTIN_REWARDS:
            return []
        close = difflib.get_close_matches(ref, list(BUILTIN_REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names = ", ".join(sorted(BUILTIN_REWARDS))
        return [
            f"unknown built-in reward {ref!r}{hint}; built-ins are {names}, and plugins are "
            "written path/to/file.py:function or package.module:function"
        ]
    fn, problems = _load(ref, Path(base_dir))
    return problems or _signature_problems(fn, columns)


def load_reward(ref: str, base_dir: str | Path) -> RewardFn:
    """Import a plugin reward function and check its signature.

    Raises:
        RewardError: With every problem `check_reward` finds.
    """
    fn, problems = _load(ref, Path(base_dir))
    problems = problems or _signature_problems(fn, None)
    if problems:
        raise RewardError(
            f"reward plugin {ref!r}: " + "; ".join(problems),
            hint="see jobspecs/plugins/example_reward.py",
        )
    return cast(RewardFn, fn)


def resolve_rewards(
    names: Sequence[str], base_dir: str | Path, options: RewardOptions | None = None
) -> list[tuple[str, RewardFn]]:
    """Map `reward_funcs` entries to functions, built-ins bound to `options`.

    Raises:
        RewardError: For an unknown built-in or a plugin that does not load.
    """
    options = options or RewardOptions()
    resolved = []
    for name in names:
        if is_plugin_ref(name):
            resolved.append((name, load_reward(name, base_dir)))
        elif name in BUILTIN_REWARDS:
            resolved.append((name, options.bind(name)))
        else:
            raise RewardError(check_reward(name, base_dir)[0])
    return resolved


def call_reward(
    name: str,
    fn: RewardFn,
    completions: Sequence[Any],
    prompts: Sequence[Any] | None,
    columns: Mapping[str, Any],
) -> list[float | None]:
    """Call reward `name` the way TRL does (all keywords) and check what comes back.

    Args:
        name: The `reward_funcs` entry, used in messages.
        fn: The reward function.
        completions: The completions.
        prompts: Their prompts.
        columns: Dataset columns and TRL's other keyword arguments, one list entry per completion.

    Returns:
        One float, or None ("skip this sample"), per completion.

    Raises:
        RewardError: If `fn` raises or returns anything but one number or None per completion.
    """
    what = f"reward function {name!r}"
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
        if inspect.isawaitable(out):  # TRL accepts async rewards; our wrapper is synchronous
            out = asyncio.run(out)  # type: ignore[arg-type]
    except Exception as e:
        raise RewardError(f"{what} raised {type(e).__name__}: {e}") from e
    # Arrays and tensors are fine (TRL builds a tensor from them); strings and scalars are not.
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardError(f"{what} returned a {type(out).__name__}, expected a list of floats")
    if len(out) != len(completions):
        raise RewardError(
            f"{what} returned {len(out)} rewards, expected {len(completions)} (one per completion)"
        )
    rewards: list[float | None] = []
    for i, r in enumerate(out):
        try:
            if isinstance(r, (str, bytes)):
                raise TypeError
            rewards.append(None if r is None else float(r))
        except (TypeError, ValueError):
            raise RewardError(
                f"{what} returned {r!r} ({type(r).__name__}) at index {i}, expected a float or None"
            ) from None
    return rewards


def trl_reward(name: str, fn: RewardFn) -> RewardFn:
    """Wrap `fn` for GRPOTrainer: checked through `call_reward`, named for TRL's metrics.

    TRL logs `rewards/<__name__>/mean`; built-ins keep their name, plugins their function name.
    """

    def reward(
        completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        return call_reward(name, fn, completions, prompts, kwargs)

    reward.__name__ = name.rpartition(":")[2]
    reward.__qualname__ = reward.__name__
    return reward
