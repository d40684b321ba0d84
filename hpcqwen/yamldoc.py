"""Untrusted YAML text -> plain data plus the line of every key, within fixed bounds.

Specs, profiles and `--set` values are read here and nowhere else. Everything that could crash,
hang or mislead the parser becomes a `SpecIssue` with the file and line, before any model sees
the data: files over `MAX_BYTES`, characters YAML does not allow, nesting deeper than
`MAX_DEPTH`, alias expansion past `MAX_NODES` values or into a cycle ("billion laughs"), integer
literals Python will not convert, keys that are not text, and NUL characters. Loading is YAML 1.1
(PyYAML's safe schema, libyaml when present) with one change: `1e-4` is a number, as in YAML 1.2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from hpcqwen.errors import SpecIssue

Loc = tuple[str | int, ...]

MAX_BYTES = 1 << 20  # a spec or profile file; the largest shipped spec is ~3 KB, a 1,000-task sweep ~60 KB
MAX_DEPTH = 32  # nested mappings/lists, aliases expanded; shipped specs nest 4 deep
MAX_NODES = 20_000  # values after alias expansion (a 1,000-task sweep of 4 knobs has ~10,000)
MAX_INT_CHARS = 40  # an integer literal (2**64 has 20 digits; Python refuses to convert > 4,300)
# What YAML 1.1 allows in a stream (the reader's check), so a bad character is reported with its line.
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SpecLoader(_BaseLoader):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's parser when installed) with the bounds of this module."""


def _marked(node: yaml.Node, problem: str) -> ConstructorError:
    return ConstructorError(None, None, problem, node.start_mark)


def _construct_int(loader: SafeConstructor, node: yaml.ScalarNode) -> Any:
    if len(str(node.value)) > MAX_INT_CHARS:
        raise _marked(node, f"an integer of {len(str(node.value))} characters is too large "
                            f"(at most {MAX_INT_CHARS})")
    try:
        return SafeConstructor.construct_yaml_int(loader, node)
    except ValueError:
        raise _marked(node, f"{_shorten(repr(node.value))} is not an integer") from None


def _construct_float(loader: SafeConstructor, node: yaml.ScalarNode) -> Any:
    try:
        return SafeConstructor.construct_yaml_float(loader, node)
    except ValueError:
        raise _marked(node, f"{_shorten(repr(node.value))} is not a number") from None


def _construct_timestamp(loader: SafeConstructor, node: yaml.ScalarNode) -> Any:
    try:
        return SafeConstructor.construct_yaml_timestamp(loader, node)
    except (ValueError, TypeError, AttributeError):
        raise _marked(node, f"{_shorten(repr(node.value))} is not a date") from None


SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
SpecLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
SpecLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)
# YAML 1.2 reads 1e-4 as a number; YAML 1.1 (PyYAML) as the text "1e-4", which a strict float field refuses.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


@dataclass
class YamlDoc:
    """A parsed YAML mapping, the line of every key (1-based) and the text of plain scalars, by path."""

    file: str
    data: Any  # a mapping for specs and profiles (parse_yaml), any value for a --set value (parse_value)
    lines: dict[Loc, int] = field(default_factory=dict)
    plain: dict[Loc, str] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """Line of `loc`, or of its closest ancestor that appears in the file."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, what: str = "file") -> tuple[str | None, list[SpecIssue]]:
    """A UTF-8 file of at most MAX_BYTES, or the issue that says why not (read at most MAX_BYTES + 1)."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, [SpecIssue(file, None, "", f"{what} not found", hint="check the path")]
    except OSError as e:
        return None, [SpecIssue(file, None, "", f"cannot read the {what}: {e.strerror or e}")]
    if len(raw) > MAX_BYTES:
        return None, [SpecIssue(file, None, "", f"the {what} is larger than {MAX_BYTES >> 10} KiB",
                                hint="a job spec is a short YAML file; put data in data files")]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return None, [SpecIssue(file, line, "", f"not UTF-8 text (byte 0x{raw[e.start]:02x})",
                                hint="save the file as UTF-8")]


def parse_yaml(text: str, file: str) -> tuple[YamlDoc | None, list[SpecIssue]]:
    """Parse `text` into a mapping, collecting every problem of the text itself (see the module doc)."""
    doc, issues = parse_value(text, file)
    if doc is None or issues:
        return None, issues
    if not isinstance(doc.data, dict):
        got = "an empty file" if doc.data is None else type(doc.data).__name__
        return None, [SpecIssue(file, 1, "", "a job spec must be a YAML mapping", got=got,
                                expected="keys such as name:, resources:, task:")]
    return doc, []


def parse_value(text: str, file: str) -> tuple[YamlDoc | None, list[SpecIssue]]:
    """Any YAML value (a spec, or a `--set` value): `YamlDoc.data` holds it, whatever its type."""
    issues = _text_issues(text, file)
    if issues:
        return None, issues
    try:
        issues, aliases = _shape_issues(text, file)
        if issues:
            return None, issues
        doc = YamlDoc(file, None)  # any value; parse_yaml narrows it to a mapping
        loader = SpecLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None and aliases:  # without aliases the events already counted every value
                issues = _graph_issues(root, file)
            if root is not None and not issues:
                issues = _walk(root, doc)  # before construction, which fails less clearly on bad keys
            if root is not None and not issues:
                doc.data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        return None, [_syntax_issue(e, file)]
    except yaml.YAMLError as e:
        return None, [SpecIssue(file, None, "", f"YAML error: {_shorten(str(e), 200)}")]
    return (None, issues) if issues else (doc, [])


def _syntax_issue(e: yaml.MarkedYAMLError, file: str) -> SpecIssue:
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark else None
    what = _shorten(" ".join(str(x) for x in (e.context, e.problem) if x), 200)
    if isinstance(e, ConstructorError):  # a value YAML could parse but not build: a tag, a bad literal
        return SpecIssue(file, line, "", what, hint="quote the value to keep it as text; specs use no !!tags")
    return SpecIssue(file, line, "", f"YAML syntax error: {what}", hint="check indentation and quoting")


def _text_issues(text: str, file: str) -> list[SpecIssue]:
    """Size, tabs in indentation, characters YAML refuses (each with its line)."""
    if len(text) > MAX_BYTES:
        return [SpecIssue(file, None, "", f"the text is larger than {MAX_BYTES >> 10} KiB")]
    issues = []
    for n, line in enumerate(text.split("\n"), 1):
        bad = _NOT_PRINTABLE.search(line)
        if bad:
            issues.append(SpecIssue(file, n, "", f"control character U+{ord(bad.group()):04X} at column "
                                    f"{bad.start() + 1} is not allowed in YAML",
                                    hint="delete it (in a double-quoted string, write it as an escape such as \\t)"))
        elif "\t" in line[: len(line) - len(line.lstrip())]:
            issues.append(SpecIssue(file, n, "", "tab character in indentation",
                                    hint="YAML indents with spaces; replace the tab"))
        if len(issues) >= 5:
            break
    return issues


def _shape_issues(text: str, file: str) -> tuple[list[SpecIssue], int]:
    """Nesting depth and value count as written, from the event stream (iterative, nothing built);
    and the number of aliases (whose expansion `_graph_issues` then bounds)."""
    depth = nodes = aliases = 0
    for event in yaml.parse(text, Loader=SpecLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return [_bound_issue(file, event.start_mark, f"is nested more than {MAX_DEPTH} levels deep")], aliases
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                return [_bound_issue(file, event.start_mark, f"has more than {MAX_NODES} values")], aliases
    return [], aliases


def _bound_issue(file: str, mark: Any, what: str) -> SpecIssue:
    return SpecIssue(file, mark.line + 1 if mark else None, "", f"the YAML {what}",
                     hint="a job spec is small and shallow; check for runaway nesting or aliases")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _graph_issues(root: yaml.Node, file: str) -> list[SpecIssue]:
    """Values and depth with aliases expanded (memoised, so a 'billion laughs' costs its text's size),
    and aliases that make a value contain itself."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        kids = _children(node)
        if not children_done:
            if id(node) in open_:
                return [_bound_issue(file, node.start_mark, "has a value that contains itself (a recursive alias)")]
            open_.add(id(node))
            stack.append((node, True))
            stack += [(k, False) for k in kids if id(k) not in size]
            continue
        open_.discard(id(node))
        values = 1 + sum(size[id(k)][0] for k in kids)
        depth = 1 + max((size[id(k)][1] for k in kids), default=0)
        if values > MAX_NODES or depth > MAX_DEPTH:
            what = f"has more than {MAX_NODES} values" if values > MAX_NODES else \
                f"is nested more than {MAX_DEPTH} levels deep"
            return [_bound_issue(file, node.start_mark, what + " once its aliases are expanded")]
        size[id(node)] = (values, depth)
    return []


def _walk(root: yaml.Node, doc: YamlDoc) -> list[SpecIssue]:
    """Record lines (and plain scalars' text); report duplicate or non-text keys and NUL characters."""
    issues: list[SpecIssue] = []
    for loc, node in _nodes(root, doc, issues):
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in str(node.value):
                issues.append(SpecIssue(doc.file, node.start_mark.line + 1, _dotted(loc), "contains a NUL character",
                                        hint="remove the \\0 escape"))
            elif not node.style and node.tag != _STR_TAG:  # plain (libyaml: "", PyYAML: None)
                doc.plain[loc] = str(node.value)
    return issues


def _nodes(root: yaml.Node, doc: YamlDoc, issues: list[SpecIssue]) -> Iterator[tuple[Loc, yaml.Node]]:
    """Every (path, node) under `root`, depth first, keys checked on the way."""
    stack: list[tuple[Loc, yaml.Node]] = [((), root)]
    while stack:
        loc, node = stack.pop()
        yield loc, node
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                doc.lines[loc + (i,)] = item.start_mark.line + 1
                stack.append((loc + (i,), item))
        elif isinstance(node, yaml.MappingNode):
            stack += reversed(_mapping_items(loc, node, doc, issues))


def _mapping_items(loc: Loc, node: yaml.MappingNode, doc: YamlDoc,
                   issues: list[SpecIssue]) -> list[tuple[Loc, yaml.Node]]:
    seen: dict[str, int] = {}
    items: list[tuple[Loc, yaml.Node]] = []
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (_STR_TAG, _MERGE_TAG):
            shown = _shorten(str(key_node.value)) if isinstance(key_node, yaml.ScalarNode) else "a list or mapping"
            issues.append(SpecIssue(doc.file, line, _dotted(loc), "keys must be text", got=shown,
                                    hint="quote the key (YAML reads yes/no/on/off, numbers and null as other types)"))
            continue
        key = str(key_node.value)
        if key in seen:
            issues.append(SpecIssue(doc.file, line, _dotted((*loc, key)), "duplicate key",
                                    hint=f"it is already set on line {seen[key]}; keep one"))
            continue
        seen[key] = line
        doc.lines[loc + (key,)] = line
        items.append((loc + (key,), value_node))
    return items


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{_shorten(part)}" if out else _shorten(part))
    return out
