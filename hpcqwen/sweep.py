"""`sweep:` in a job spec: a grid or a list of task-knob values (plus seeds) compiled into ONE job array.

```yaml
sweep:
  grid: {learning_rate: [1e-4, 3e-4], lora_rank: [4, 8]}   # every combination, in key order
  points: [{learning_rate: 1e-3, lora_rank: 16}]           # and/or explicit points
  seeds: [1, 2]                                             # each point once per seed (task.seed)
```
`compile_sweep` runs on the raw spec data before validation (`spec.parse_spec`): it checks the
section (strict types, bounded sizes: the number of tasks is computed before any list is built),
validates every distinct value against the task model once (an error names `sweep.grid.<knob>[i]`,
not a task of the array), and writes the points as `array.tasks` (per-task overrides, the mechanism
plain arrays use). The section itself is kept in `spec.json`, so `hpcqwen sweep report` knows which
knobs were swept. Chunking under MaxArraySize happens at submit (`hpcqwen.arrays`).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from hpcqwen import specfile
from hpcqwen.errors import SpecIssue
from hpcqwen.fields import MAX_ARRAY, MAX_SEED, SPEC_CONFIG
from hpcqwen.yamldoc import YamlDoc

MAX_SWEEP_VALUES = 10_000  # values of one knob
KNOB_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class SweepSpec(BaseModel):
    """What a sweep varies. Keys are task knobs (dotted for nested ones), as in `array.tasks`."""

    model_config = SPEC_CONFIG
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Knob -> values; every combination "
                                       "runs (the first knob varies slowest).")
    points: list[dict[str, Any]] = Field(default_factory=list, description="Explicit points, each a mapping "
                                         "of knob -> value (after the grid's).")
    seeds: list[int] = Field(default_factory=list, description="Run every point once per seed (sets task.seed).")

    def size(self) -> int:
        """Tasks the sweep makes (computed without building them)."""
        grid = math.prod(len(v) for v in self.grid.values()) if self.grid else 0
        return (grid + len(self.points)) * max(1, len(self.seeds))

    def knobs(self) -> list[str]:
        """The swept knobs in report order (grid, then points' keys, then seed)."""
        keys = list(self.grid)
        keys += [k for p in self.points for k in p if k not in keys]
        return keys + (["seed"] if self.seeds and "seed" not in keys else [])

    def tasks(self) -> list[dict[str, Any]]:
        """One override mapping per array task."""
        names = list(self.grid)
        points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.grid.values())] \
            if self.grid else []
        points += [dict(p) for p in self.points]
        if not self.seeds:
            return points
        return [{**p, "seed": s} for p in points for s in self.seeds]


def compile_sweep(data: dict[str, Any], doc: YamlDoc, issues: list[SpecIssue]) -> None:
    """Replace a raw spec's `sweep:` by `array.tasks` (in place); problems go to `issues`."""
    raw = data.get("sweep")
    if raw is None:
        return
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as e:
        issues += specfile.issues_from_validation(e, SweepSpec, doc, prefix=("sweep",))
        return
    problems = _shape_problems(sweep, data)
    if not problems:
        problems = _value_problems(sweep, data.get("task"))
    if problems:
        issues += [SpecIssue(doc.file, doc.line_of(loc), specfile.dotted_key(loc), msg, got, expected, hint)
                   for loc, msg, got, expected, hint in problems]
        return
    array = data.get("array")
    array = dict(array) if isinstance(array, dict) else {}
    array["tasks"] = sweep.tasks()
    data["array"] = array


Found = tuple[tuple[str | int, ...], str, str, str, str]  # loc, message, got, expected, hint


def _shape_problems(sweep: SweepSpec, data: dict[str, Any]) -> list[Found]:
    out: list[Found] = []
    if not sweep.grid and not sweep.points:
        out.append((("sweep",), "needs `grid:` or `points:`", "", "e.g. grid: {learning_rate: [1e-4, 1e-3]}", ""))
    for key, values in sweep.grid.items():
        if not re.fullmatch(KNOB_PATTERN, key) or key == "kind":
            out.append((("sweep", "grid", key), "is not a task knob name", repr(key)[:60], "a knob such as "
                        "learning_rate (dotted for nested ones)", ""))
        if not values or len(values) > MAX_SWEEP_VALUES:
            out.append((("sweep", "grid", key), f"needs 1 to {MAX_SWEEP_VALUES} values", f"{len(values)} values",
                        "", ""))
    for i, point in enumerate(sweep.points):
        bad = [k for k in point if not re.fullmatch(KNOB_PATTERN, k) or k == "kind"]
        if bad:
            out.append((("sweep", "points", i), "is not a task knob name", repr(bad[0])[:60],
                        "knobs such as learning_rate (the task's kind cannot vary)", ""))
    if any(s < 0 or s > MAX_SEED for s in sweep.seeds):
        out.append((("sweep", "seeds"), f"seeds must be in 0..{MAX_SEED}", str(sweep.seeds)[:60], "", ""))
    size = sweep.size()
    if size > MAX_ARRAY:
        out.append((("sweep",), f"makes {size} tasks", str(size), f"<= {MAX_ARRAY}", "sweep fewer values"))
    array = data.get("array")
    if isinstance(array, dict) and array.get("tasks"):
        out.append((("array", "tasks"), "a spec has either `sweep:` or `array.tasks`, not both", "", "",
                    "move the per-task overrides into sweep.points"))
    return out


def _value_problems(sweep: SweepSpec, task: Any) -> list[Found]:
    """Every distinct value, alone on the task, must validate (reported where it is written)."""
    from hpcqwen.tasks import TASK_ADAPTER, TASK_KINDS

    if not isinstance(task, dict):
        return []  # the task section's own problem is reported by the model
    out: list[Found] = []
    places: list[tuple[tuple[str | int, ...], dict[str, Any]]] = [
        (("sweep", "grid", k, i), {k: v}) for k, vs in sweep.grid.items() for i, v in enumerate(vs)]
    places += [(("sweep", "points", i), p) for i, p in enumerate(sweep.points)]
    places += [(("sweep", "seeds", i), {"seed": s}) for i, s in enumerate(sweep.seeds[:1])]
    for loc, overrides in places:
        data = dict(task)
        for key, value in overrides.items():
            specfile.apply_override(data, str(key).split("."), value)
        try:
            TASK_ADAPTER.validate_python(data)
        except ValidationError as e:
            err = e.errors()[0]
            tloc = ("task", *err["loc"][1:])  # past the union tag
            issue = specfile.issue_from_error(err, tloc, "", None, TASK_KINDS.get(str(data.get("kind"))))
            out.append((loc, f"{issue.key}: {issue.message}", issue.got, issue.expected, issue.hint))
    return out


def sweep_of(spec: Any) -> SweepSpec | None:
    """The spec's sweep section, if it has one."""
    sweep = getattr(spec, "sweep", None)
    return sweep if isinstance(sweep, SweepSpec) else None
