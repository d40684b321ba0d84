"""Checks a reward plugin without running any of its code: what spec validation (and so `hpcqwen render`)
may know about `path/file.py:function` or `package.module:function`.

Importing a plugin runs user code, which a preview must not do; `hpcqwen submit` imports the run dir's
copy afterwards (`hpcqwen.inputs`). Here the source is found without importing anything (for a module,
through the import system's path finders, parent packages included), parsed with `ast`, and the named
top-level function's parameters are checked by the same rules as an imported one's. A name bound some
other way (an assignment, an import) cannot be checked without running the file: the import at submit does.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from collections.abc import Collection
from importlib.machinery import BuiltinImporter, FrozenImporter, PathFinder
from pathlib import Path

from hpcqwen.rewards.builtin import BUILTIN_REWARDS
from hpcqwen.rewards.plugins import (
    check_reward,
    class_problem,
    is_plugin_ref,
    parameter_problems,
    split_plugin_ref,
)

MAX_PLUGIN_BYTES = 4 << 20  # a reward plugin is a few KB; a bigger file is not read on the login node


def check_reward_ref(ref: str, base_dir: str | Path, columns: Collection[str] | None = None) -> list[str]:
    """What is wrong with one `reward_funcs` entry (a built-in, or a plugin read without running it)."""
    if not is_plugin_ref(ref):
        return check_reward(ref, base_dir) if ref not in BUILTIN_REWARDS else []
    return check_plugin_statically(ref, base_dir, columns)


def check_plugin_statically(ref: str, base_dir: str | Path, columns: Collection[str] | None = None) -> list[str]:
    """List what is wrong with a plugin reference, reading its source only.

    Args:
        ref: `path/file.py:function` (resolved against `base_dir`) or `package.module:function`.
        base_dir: The folder relative plugin paths belong to (the spec's).
        columns: Dataset columns, when known; required parameters must be among them.

    Returns:
        Problems as sentences (empty when nothing is wrong that can be seen without running it).
    """
    try:
        target, func = split_plugin_ref(ref, Path(base_dir))
    except ValueError as e:
        return [str(e)]
    if isinstance(target, Path):
        if not target.is_file():
            return [f"file {target} does not exist"]
        source: Path | None = target
    else:
        found = module_source(target)
        if found is False:
            return [f"module {target} is not installed here (found without importing it)"]
        source = found if isinstance(found, Path) else None
    if source is None:
        return []  # a built-in or compiled module: nothing to read
    return _check_source(source, str(target), func, columns)


def module_source(name: str) -> Path | bool:
    """The `.py` file of module `name`, found without importing it or its parent packages; True when it
    exists but has no Python source (built-in, compiled), False when it is not installed."""
    top = name.split(".")[0]
    if "." not in name and (BuiltinImporter.find_spec(top) or FrozenImporter.find_spec(top)):
        return True
    search: list[str] | None = None
    spec = None
    for depth in range(1, name.count(".") + 2):
        spec = PathFinder.find_spec(".".join(name.split(".")[:depth]), search)
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or [])
    origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else True


def _check_source(path: Path, target: str, func: str, columns: Collection[str] | None) -> list[str]:
    try:
        with path.open("rb") as f:
            text = f.read(MAX_PLUGIN_BYTES + 1)
        if len(text) > MAX_PLUGIN_BYTES:
            return [f"{path} is larger than {MAX_PLUGIN_BYTES >> 20} MiB, which a reward plugin is not"]
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        return [f"syntax error in {e.filename or path}:{e.lineno}: {e.msg}"]
    except (OSError, ValueError) as e:
        return [f"cannot read {path}: {e}"]
    bound = _top_level_names(tree)
    node = bound.get(func)
    if node is None:
        functions = [n for n, v in bound.items() if isinstance(v, (ast.FunctionDef, ast.AsyncFunctionDef))]
        close = difflib.get_close_matches(func, functions, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it defines: {', '.join(functions)}"
        return [f"{target} has no function {func!r}; {hint}"]
    if isinstance(node, ast.ClassDef):
        return [class_problem(func)]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return parameter_problems(func, _parameters(node.args), columns)
    return []  # bound by an assignment or import: known only by running the file (submit imports it)


def _top_level_names(tree: ast.Module) -> dict[str, ast.stmt]:
    """Each name the module binds at top level -> the statement that binds it last."""
    names: dict[str, ast.stmt] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                names.update({n.id: stmt for n in ast.walk(t) if isinstance(n, ast.Name)})
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: stmt for a in stmt.names})
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):  # conditional definitions: bound, not checkable
            names.update({n: stmt for n in _bound_inside(stmt)})
    return names


def _bound_inside(stmt: ast.stmt) -> set[str]:
    """Names a compound statement may bind (definitions and assignments anywhere in it)."""
    found = set()
    for node in ast.walk(stmt):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
    return found


def _parameters(args: ast.arguments) -> list[inspect.Parameter]:
    """The parameters of a `def` as `inspect` would report them (defaults stand in as None)."""
    P = inspect.Parameter
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    params = [P(a.arg, P.POSITIONAL_ONLY if i < len(args.posonlyargs) else P.POSITIONAL_OR_KEYWORD,
                default=None if i >= first_default else P.empty) for i, a in enumerate(positional)]
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    params += [P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else None)
               for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return params
