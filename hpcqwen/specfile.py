"""Reading YAML job specs with line numbers, and turning every problem into a `SpecIssue`.

`spec.py` owns the models; this module owns the text: tabs, YAML syntax, duplicate keys,
the `path -> line` map, `--set` overrides, `${ENV}` expansion in path fields, and the
translation of pydantic's errors into `file:line: key: what (got X; expected Y) — hint`.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hpcqwen.errors import SpecIssue

Loc = tuple[str | int, ...]


@dataclass
class YamlDoc:
    """A parsed YAML mapping plus the line of every key (1-based), keyed by its path."""

    file: str
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """Line of `loc`, or of its closest ancestor that appears in the file."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def parse_yaml(text: str, file: str) -> tuple[YamlDoc | None, list[SpecIssue]]:
    """Parse `text` into a mapping, collecting tab, syntax and duplicate-key problems."""
    issues = [
        SpecIssue(file, n, "", "tab character in indentation", hint="YAML indents with spaces; replace the tab")
        for n, line in enumerate(text.splitlines(), 1)
        if "\t" in line[: len(line) - len(line.lstrip())]
    ]
    if issues:
        return None, issues
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 (SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(x for x in (e.context, e.problem) if x)
        return None, [SpecIssue(file, line, "", f"YAML syntax error: {what}", hint="check indentation and quoting")]
    if root is None or not isinstance(data, dict):
        got = "an empty file" if root is None else type(data).__name__
        return None, [SpecIssue(file, 1, "", "a job spec must be a YAML mapping", got=got,
                                expected="keys such as name:, resources:, task:")]
    doc = YamlDoc(file, data)
    _walk(root, (), doc, issues)
    return doc, issues


def _walk(node: yaml.Node, loc: Loc, doc: YamlDoc, issues: list[SpecIssue]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = dotted_key((*loc, key))
                issues.append(SpecIssue(doc.file, line, dotted, "duplicate key",
                                        hint=f"it is already set on line {seen[key]}; keep one"))
                continue
            seen[key] = line
            doc.lines[loc + (key,)] = line
            _walk(value_node, loc + (key,), doc, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[loc + (i,)] = item.start_mark.line + 1
            _walk(item, loc + (i,), doc, issues)


def dotted_key(loc: Sequence[str | int]) -> str:
    """('array', 'tasks', 0, 'lr') -> 'array.tasks[0].lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- --set overrides ------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """'resources.nodes=2' -> (['resources', 'nodes'], 2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ValueError(f"--set expects KEY=VALUE with a dotted key, e.g. resources.nodes=2 (got {text!r})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set `data[k1][k2]... = value`, creating mappings on the way (a string `cluster: x`
    becomes `{profile: x}` so `--set cluster.run_root=...` works)."""
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if isinstance(child, str) and k == "cluster":
            child = {"profile": child}
        if not isinstance(child, dict):
            child = {}
        node[k] = child
        node = child
    node[keys[-1]] = value


# ---- ${ENV} expansion (documented for path fields only) -------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(value: str, base_dir: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """Expand `${VAR}`, `${VAR:-default}` and `~`, then make the path absolute against `base_dir`.

    Raises:
        ValueError: a referenced variable is unset and has no default.
    """
    env = os.environ if environ is None else environ

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")

    expanded = os.path.expanduser(_ENV_RE.sub(sub, value))
    path = Path(expanded)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(Path(os.path.normpath(path)))


# ---- pydantic errors -> SpecIssue -------------------------------------------------------

def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class that owns the keys at pydantic's raw `loc`.

    Follows nested sections; inside a tagged union pydantic's loc names the member by its
    tag (('task', 'command', 'module')), which picks the member here.
    """
    current: type[BaseModel] | None = model
    parts = list(loc)
    while parts and current is not None:
        part = parts.pop(0)
        info = current.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        current, consumed = _member_for(_union_members(info.annotation), parts)
        del parts[:consumed]
    return current


def _member_for(members: list[type[BaseModel]], rest: list[str | int]) -> tuple[type[BaseModel] | None, int]:
    """The member a loc continues into, and whether the next loc part was its union tag."""
    if rest and any("kind" in m.model_fields for m in members):
        for m in members:
            if rest[0] in typing.get_args(m.model_fields["kind"].annotation):
                return m, 1
    return (members[0] if len(members) == 1 else None), 0


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _union_members(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in args for m in _union_members(a)]
    return []


def unknown_key_hint(key: str, valid: Sequence[str]) -> str:
    """'did you mean X? valid keys: ...' for an unknown key (submitit's valid-key lists)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    keys = ", ".join(sorted(valid))
    return (f"did you mean '{close[0]}'? " if close else "") + f"valid keys: {keys}"


def issue_from_error(err: Mapping[str, Any], loc: Loc, file: str, line: int | None,
                     owner: type[BaseModel] | None) -> SpecIssue:
    """Translate one pydantic error (already mapped to the user's `loc`) into a SpecIssue."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if loc and loc[-1] == "[key]":  # pydantic's marker for a bad mapping key
        loc = loc[:-1]
    key = dotted_key(loc)
    got = _short(value)
    if kind == "extra_forbidden":
        valid = list(owner.model_fields) if owner else []
        return SpecIssue(file, line, key, "unknown key", hint=unknown_key_hint(str(loc[-1]), valid))
    if kind == "missing":
        return SpecIssue(file, line, key, "required key is missing", hint=f"add `{loc[-1]}:` to the spec")
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return SpecIssue(file, line, key, "must be a whole number", got=got, expected="an integer such as 2")
    if kind in ("float_parsing", "float_type"):
        return SpecIssue(file, line, key, "must be a number", got=got, expected="a number such as 1e-4")
    if kind in ("bool_parsing", "bool_type"):
        return SpecIssue(file, line, key, "must be true or false", got=got, expected="true or false")
    if kind in ("string_type",):
        return SpecIssue(file, line, key, "must be a string", got=got, expected="text")
    if kind in ("list_type", "tuple_type"):
        return SpecIssue(file, line, key, "must be a list", got=got, expected="a YAML list")
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return SpecIssue(file, line, key, "must be a mapping", got=got, expected="a YAML mapping of keys")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return SpecIssue(file, line, key, f"must be {bounds[kind]} {limit}", got=got,
                         expected=f"{bounds[kind]} {limit}")
    if kind == "literal_error":
        return SpecIssue(file, line, key, "not an allowed value", got=got, expected=f"one of {ctx.get('expected')}")
    if kind in ("enum",):
        return SpecIssue(file, line, key, "not an allowed value", got=got, expected=f"one of {ctx.get('expected')}")
    if kind == "string_pattern_mismatch":
        return SpecIssue(file, line, key, "has characters that are not allowed", got=got,
                         expected=f"text matching {ctx.get('pattern')}")
    if kind == "union_tag_invalid":
        return SpecIssue(file, line, key + ".kind" if key else "kind", "unknown task kind", got=_short(ctx.get("tag")),
                         expected=f"one of {ctx.get('expected_tags')}")
    if kind == "union_tag_not_found":
        from hpcqwen.tasks import TASK_KINDS  # here, not at the top: task models import this module

        return SpecIssue(file, line, key, "missing `kind`", expected=f"one of {', '.join(sorted(TASK_KINDS))}",
                         hint="add e.g. `kind: sft` under task:")
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        return SpecIssue(file, line, key, message, got=got if not isinstance(value, (dict, list)) else "")
    return SpecIssue(file, line, key, err["msg"], got=got)


def issues_from_validation(exc: ValidationError, model: type[BaseModel], doc: YamlDoc,
                           prefix: Loc = (), overridden: Mapping[Loc, str] | None = None) -> list[SpecIssue]:
    """All of a ValidationError's errors as SpecIssues with file lines.

    Args:
        exc: the error raised by `model.model_validate`.
        model: the model that was validated (to list valid keys for unknown ones).
        doc: the YAML document the data came from (for lines).
        prefix: where `model`'s data sits inside `doc` (e.g. ('cluster',)).
        overridden: paths set by `--set` (and the flag's text), reported as such.
    """
    issues = []
    for err in exc.errors():
        raw: Loc = tuple(err["loc"])
        owner = model_at(model, raw[:-1]) if err["type"] == "extra_forbidden" else None
        full = prefix + _strip_tags(model, raw)
        file, line = doc.file, doc.line_of(full)
        for path, flag in (overridden or {}).items():
            if full[: len(path)] == path:
                file, line = f"--set {flag}", None
        issues.append(issue_from_error(err, full, file, line, owner))
    return issues


def _strip_tags(model: type[BaseModel], loc: Loc) -> Loc:
    """Drop the union tags pydantic inserts into locs, so keys read as the user wrote them."""
    out: list[str | int] = []
    current: type[BaseModel] | None = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        info = current.model_fields.get(part) if current is not None and isinstance(part, str) else None
        if info is None:
            current = None
            continue
        current, consumed = _member_for(_union_members(info.annotation), parts)
        del parts[:consumed]
    return tuple(out)
