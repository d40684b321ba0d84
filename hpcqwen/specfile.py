"""Job-spec text around the models: `--set` overrides, `${ENV}` in path fields, and error translation.

`spec.py` owns the models and `yamldoc.py` the YAML text (bounds, characters, duplicate keys, the
`path -> line` map); this module owns `--set KEY=VALUE` (its value read by the same bounded loader),
`${ENV}` expansion in path fields (paths bounded as the kernel bounds them), and the translation of
pydantic's errors into `file:line: key: what (got X; expected Y) — hint`, every value shortened.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from hpcqwen import yamldoc
from hpcqwen.errors import MAX_ISSUES, SpecIssue
from hpcqwen.fields import check_path_shape
from hpcqwen.yamldoc import Loc, YamlDoc, parse_yaml

__all__ = ["Loc", "YamlDoc", "apply_override", "dotted_key", "expand_path", "issue_from_error",
           "issues_from_validation", "parse_override", "parse_yaml"]
# Set in site profiles only: a Jinja template runs Python while rendering, and setup lines are raw shell.
SITE_ONLY = ("setup", "template_dir")


def dotted_key(loc: Sequence[str | int]) -> str:
    """('array', 'tasks', 0, 'lr') -> 'array.tasks[0].lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- --set overrides ------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """'resources.nodes=2' -> (['resources', 'nodes'], 2).

    The value is read as YAML by the spec loader (same bounds); text that is not valid YAML stays
    text. An environment value (`env.X=...`, `cluster.env.X=...`) is always the text as written.

    Raises:
        ValueError: not KEY=VALUE, or a site-only key (cluster.setup, cluster.template_dir).
    """
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ValueError(f"--set expects KEY=VALUE with a dotted key, e.g. resources.nodes=2 (got {_short(text)})")
    keys = key.split(".")
    if keys[0] == "cluster" and len(keys) > 1 and keys[1] in SITE_ONLY:
        raise ValueError(f"cluster.{keys[1]} is a site setting: it belongs in a cluster profile, not in --set "
                         "(see HPCQWEN_PROFILE_PATH)")
    if _is_env_value(keys):
        return keys, raw
    if not raw.strip():
        return keys, ""
    doc, issues = yamldoc.parse_value(raw, "--set")
    return keys, raw if doc is None or issues else doc.data


def _is_env_value(keys: list[str]) -> bool:
    return (len(keys) == 2 and keys[0] == "env") or (len(keys) == 3 and keys[:2] == ["cluster", "env"])


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


def overridden_by(loc: Loc, overridden: Mapping[Loc, str] | None) -> str | None:
    """The `--set` text that set `loc` (or a section above it), if any."""
    for path, flag in (overridden or {}).items():
        if tuple(loc[: len(path)]) == path:
            return flag
    return None


def env_as_written(env: Any, doc: YamlDoc, prefix: Loc, overridden: Mapping[Loc, str] | None = None) -> list[SpecIssue]:
    """Keep environment values as the YAML text wrote them (`010` stays "010", `on` stays "on"), in place.

    YAML would turn plain scalars into numbers, booleans or null, and `json.dumps` of those is not
    what was written. A value with no text (`NCCL_DEBUG:`) is refused; lists and mappings are left
    for the model to refuse.
    """
    if not isinstance(env, dict):
        return []
    issues = []
    for key, value in list(env.items()):
        loc = (*prefix, key)
        if isinstance(value, str) or overridden_by(loc, overridden):
            continue
        text = doc.plain.get(loc)
        if value is None:
            del env[key]  # reported here, not again by the model
            issues.append(SpecIssue(doc.file, doc.line_of(loc), dotted_key(loc), "has no value", expected="text",
                                    hint=f"write {str(key)[:40]}: \"\" for an empty value, or remove the key"))
        elif text is not None and isinstance(value, (bool, int, float, dt.date)):
            env[key] = text
    return issues


# ---- ${ENV} expansion (documented for path fields only) -------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(value: str, base_dir: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """Expand `${VAR}`, `${VAR:-default}` and `~`, then make the path absolute against `base_dir`. A value
    that starts with `${stages.` (a pipeline reference) is kept as written: the node resolves it.

    Raises:
        ValueError: a referenced variable is unset and has no default, or the path is longer than
            the kernel allows (fields.check_path_shape).
    """
    env = os.environ if environ is None else environ
    if value.startswith("${stages."):  # a pipeline stage's reference: resolved on the node (hpcqwen.stagerefs)
        check_path_shape(value)
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")

    check_path_shape(value)
    expanded = os.path.expanduser(_ENV_RE.sub(sub, value))
    path = Path(expanded)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    result = str(Path(os.path.normpath(path)))
    check_path_shape(result)
    return result


# ---- pydantic errors -> SpecIssue -------------------------------------------------------

def _short(value: Any) -> str:
    """A value as an error message shows it: at most 60 characters, types YAML's way."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 192:
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, (bytes, bytearray)):
        return f"binary data ({len(value)} bytes)"
    if isinstance(value, (dt.date, dt.datetime)):
        return f"the date {value.isoformat()}"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _quote_hint(value: Any) -> str:
    """For a scalar YAML read as another type: how to keep it as text."""
    if isinstance(value, bool):
        return f"YAML reads this as a boolean; write '{str(value).lower()}' (quoted) for the text"
    if isinstance(value, (int, float, dt.date)):
        shown = value.isoformat() if isinstance(value, dt.date) else _short(value)
        return f"YAML reads this as a {type(value).__name__}; write '{shown}' (quoted) for the text"
    return ""


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


def union_tags(model: type[BaseModel], loc: Loc) -> list[str]:
    """The `kind` tags of the tagged union at pydantic's raw `loc` (e.g. ('task',)); [] where there is none."""
    owner = model_at(model, loc[:-1])
    info = owner.model_fields.get(loc[-1]) if owner is not None and loc and isinstance(loc[-1], str) else None
    members = _union_members(info.annotation) if info is not None else []
    return [str(t) for m in members if "kind" in m.model_fields
            for t in typing.get_args(m.model_fields["kind"].annotation)]


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
    if kind == "finite_number":
        return SpecIssue(file, line, key, "must be a finite number", got=got, expected="a number such as 1e-4")
    if kind in ("bool_parsing", "bool_type"):
        return SpecIssue(file, line, key, "must be true or false", got=got, expected="true or false")
    if kind in ("string_type",):
        return SpecIssue(file, line, key, "must be a string", got=got, expected="text", hint=_quote_hint(value))
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
    if kind == "string_too_long":
        limit = ctx.get("max_length")
        length = f"{len(value)} characters" if isinstance(value, str) else got
        return SpecIssue(file, line, key, "is too long", got=length, expected=f"at most {limit} characters")
    if kind == "string_pattern_mismatch":
        return SpecIssue(file, line, key, "has characters that are not allowed", got=got,
                         expected=f"text matching {ctx.get('pattern')}")
    if kind == "union_tag_invalid":
        return SpecIssue(file, line, key + ".kind" if key else "kind", "unknown task kind", got=_short(ctx.get("tag")),
                         expected=f"one of {ctx.get('expected_tags')}")
    if kind == "union_tag_not_found":
        tags = ctx.get("tags") or ()
        return SpecIssue(file, line, key, "missing `kind`", expected=f"one of {', '.join(sorted(tags))}" if tags
                         else "a task kind", hint="add e.g. `kind: sft` under task:")
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
    errors = exc.errors()
    for err in errors[:MAX_ISSUES]:
        raw: Loc = tuple(err["loc"])
        owner = model_at(model, raw[:-1]) if err["type"] == "extra_forbidden" else None
        if err["type"] == "union_tag_not_found":  # name the tags the union knows (pydantic does not)
            err = {**err, "ctx": {**(err.get("ctx") or {}), "tags": union_tags(model, raw)}}
        full = prefix + _strip_tags(model, raw)
        file, line = doc.file, doc.line_of(full)
        for path, flag in (overridden or {}).items():
            if full[: len(path)] == path:
                file, line = f"--set {flag}", None
        issues.append(issue_from_error(err, full, file, line, owner))
    if len(errors) > MAX_ISSUES:
        issues.append(SpecIssue(doc.file, None, "", f"{len(errors) - MAX_ISSUES} more problems like these",
                                hint="fix the ones above first"))
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
