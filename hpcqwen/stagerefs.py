"""`${stages.<name>.<output>}`: a pipeline stage's reference to an earlier stage's output (pure text functions).

A reference may stand anywhere in a text value (`args: ["${stages.sft.run_dir}/model"]`); in a path
field (model, dataset, load, adapters, result_path) it must start the value, which is then kept as
written on the login node (`specfile.expand_path`) and resolved on the node when the stage starts
(`hpcqwen.pipeline.resolve_stage_spec`). Outside a pipeline a reference is a spec error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

PREFIX = "${stages."
REF_RE = re.compile(r"\$\{stages\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.([a-z_]+)\}")
"""A reference: group 1 the stage, group 2 the output."""
ANY_REF_RE = re.compile(r"\$\{stages\.[^}]*\}?")
"""Anything that starts like a reference (a malformed one is reported, never passed on)."""

Loc = tuple[str | int, ...]


def is_stage_ref(value: object) -> bool:
    """A value that starts with a stage reference (kept as written until the node resolves it)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def find_refs(data: Any, loc: Loc = ()) -> Iterator[tuple[Loc, str]]:
    """(location, text) of every string in `data` that holds something reference-shaped."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from find_refs(value, (*loc, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from find_refs(value, (*loc, i))
    elif isinstance(data, str) and PREFIX in data:
        yield loc, data


def parse_refs(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """([(stage, output)], [malformed pieces]) of one text value."""
    good = [(m.group(1), m.group(2)) for m in REF_RE.finditer(text)]
    bad = [m.group(0) for m in ANY_REF_RE.finditer(text) if not REF_RE.fullmatch(m.group(0))]
    return good, bad


def substitute(data: Any, value_of: Callable[[str, str], str]) -> Any:
    """A copy of `data` with every reference replaced by `value_of(stage, output)`."""
    if isinstance(data, dict):
        return {k: substitute(v, value_of) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, value_of) for v in data]
    if isinstance(data, str) and PREFIX in data:
        return REF_RE.sub(lambda m: value_of(m.group(1), m.group(2)), data)
    return data
