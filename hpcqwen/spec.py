"""Job specs: typed, frozen, validated once on the login node.

`load_spec(path, overrides)` checks user input without touching anything outside the spec: it reads
the YAML with line numbers, applies `--set` overrides, merges the cluster profile, expands `${ENV}`
in the documented path fields, compiles a `sweep:` into `array.tasks`, validates every section and
the cross-field rules, and raises one `SpecError` listing every problem. What needs the filesystem
or the cluster (model folders, datasets, plugins, partitions) is `hpcqwen.preflight`'s, which passes
its checks in as `extra` so that one message still lists every problem. The node reads the frozen
result (`spec.json`) with `read_frozen_spec` and never re-resolves defaults.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from hpcqwen import cluster as cluster_mod
from hpcqwen import specfile, stagerefs, yamldoc
from hpcqwen.cluster import ClusterProfile, EnvName
from hpcqwen.errors import Problem, SpecError, SpecIssue
from hpcqwen.fields import JOB_ID_RE, SECRET_RE, check_path_shape
from hpcqwen.spec_sections import ArraySpec, Dependency, Requeue, Resources, Section, Watchdog
from hpcqwen.specfile import Loc, YamlDoc
from hpcqwen.sweep import SweepSpec, compile_sweep
from hpcqwen.tasks import TASK_ADAPTER, TASK_KINDS, TaskSpec


class JobSpec(Section):
    """A whole job: where it runs, what it asks for, and what it does."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Job and run-dir name.")
    cluster: ClusterProfile = Field(description="Profile name, or {profile: name, <field>: override}.")
    resources: Resources = Field(default_factory=Resources)
    array: ArraySpec | None = Field(None, description="Run as a job array.")
    sweep: SweepSpec | None = Field(None, description="A grid or list of task-knob values (and seeds), run as "
                                    "one job array (it fills array.tasks).")
    depends_on: list[Dependency] = Field(default_factory=list, description="Jobs this one waits for.")
    env: dict[EnvName, str] = Field(default_factory=dict, description="Extra environment (no secrets).")
    requeue: Requeue = Field(default_factory=Requeue)
    watchdog: Watchdog = Field(default_factory=Watchdog)
    task: TaskSpec = Field(description="What runs: a mapping with `kind:` and its knobs.")

    @field_validator("depends_on", mode="before")
    @classmethod
    def _dependency_forms(cls, value: Any) -> Any:
        if isinstance(value, (str, int, dict)) and not isinstance(value, bool):
            value = [value]  # one dependency without the list
        if not isinstance(value, list):
            return value  # pydantic reports "must be a list"
        out = []
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                item = {"job": str(item)}
            elif isinstance(item, str):
                kind, sep, job = item.partition(":")
                item = {"job": job, "type": kind} if sep and kind.startswith("after") else {"job": item}
            out.append(item)
        return out

    # ---- derived values (everything the renderer and launcher need) -------------------
    @property
    def gpus_per_node(self) -> int:
        """GPUs per node after profile defaults."""
        r = self.resources.gpus_per_node
        return self.cluster.gpus_per_node if r is None else r

    @property
    def nproc_per_node(self) -> int:
        """Processes per node: the spec's value, else one per GPU, else 1."""
        return self.resources.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        """Training processes across all nodes (a GRPO task's rollout nodes run none)."""
        return (self.resources.nodes - self.rollout_nodes) * self.nproc_per_node

    @property
    def rollout_nodes(self) -> int:
        """Nodes that serve vLLM rollouts (GRPO `task.rollout.nodes`; the last ones of the allocation)."""
        rollout = getattr(self.task, "rollout", None)
        return int(rollout.nodes) if rollout is not None else 0

    def task_for(self, array_index: int | None) -> TaskSpec:
        """The task of one array index, with that index's overrides applied (validated at load)."""
        if self.array is None or not self.array.tasks or array_index is None:
            return self.task
        data = self.task.model_dump(mode="json")
        for key, value in self.array.tasks[array_index].items():
            specfile.apply_override(data, str(key).split("."), value)
        task: TaskSpec = TASK_ADAPTER.validate_python(data)
        return task


# ---- loading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecSource:
    """Where a spec came from (for the script header and the run dir)."""

    path: str
    text: str
    sha256: str
    overrides: tuple[str, ...] = ()


def read_source(path: str | Path, overrides: tuple[str, ...] = ()) -> SpecSource:
    """Read a spec file (UTF-8, at most yamldoc.MAX_BYTES); a missing or unreadable file is a SpecError naming it."""
    text, issues = yamldoc.read_text(Path(path))
    if text is None:
        if issues[0].message == "file not found":
            issues = [SpecIssue(str(path), None, "", "file not found", hint="check the path (specs live in jobspecs/)")]
        raise SpecError(str(path), issues)
    digest = hashlib.sha256((text + "\0" + "\0".join(overrides)).encode()).hexdigest()
    return SpecSource(str(path), text, digest, overrides)


ExtraChecks = Callable[[JobSpec], list[Problem]]
"""Checks a caller adds to validation (preflight's file checks), reported with the spec's own problems."""


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), extra: ExtraChecks | None = None,
              *, stage_refs: bool = False) -> JobSpec:
    """Load, merge and validate a job spec; raise SpecError with every problem found."""
    source = read_source(path, tuple(overrides))
    return parse_spec(source, extra, stage_refs=stage_refs)


def parse_spec(source: SpecSource, extra: ExtraChecks | None = None, *, stage_refs: bool = False) -> JobSpec:
    """Validate an already-read spec (see load_spec). `extra` runs once the spec validated and its problems
    join the spec's own; `stage_refs` lets path and text values start with `${stages.<name>.<output>}`
    (pipeline stages only: hpcqwen.pipeline resolves them on the node)."""
    file = source.path
    doc, issues = specfile.parse_yaml(source.text, file)
    if doc is None:
        raise SpecError(file, issues)
    overridden = _apply_overrides(doc, source.overrides, issues)
    base_dir = Path(file).resolve().parent
    data = copy.deepcopy(doc.data)
    if not stage_refs:
        issues += [SpecIssue(file, doc.line_of(loc), specfile.dotted_key(loc), "refers to a pipeline stage, which "
                             "only a stage of a pipeline file can", got=specfile._short(text),
                             hint="submit it with `hpcqwen pipeline submit PIPELINE.yaml`")
                   for loc, text in stagerefs.find_refs(data)]
    profile = cluster_mod.resolve_profile(doc, data.get("cluster", "local"), issues, base_dir, overridden)
    # A placeholder keeps the other sections checkable when the profile itself is wrong.
    data["cluster"] = profile if profile is not None else {"profile": "?"}
    # A task kind may fill sections from its own knobs (distill: `shards` -> `array.size`).
    task_kind = TASK_KINDS.get(str(data["task"].get("kind"))) if isinstance(data.get("task"), dict) else None
    derive = getattr(task_kind, "derive_spec", None)
    if derive is not None:
        derive(data)
    compile_sweep(data, doc, issues)
    _check_env(doc, data.get("env"), issues)
    issues += specfile.env_as_written(data.get("env"), doc, ("env",), overridden)
    spec = None
    try:
        spec = JobSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        issues += specfile.issues_from_validation(e, JobSpec, doc, overridden=overridden)
    if spec is not None:
        spec = _resolve_array_tasks(spec, base_dir)
    if spec is not None and profile is not None:
        issues += _cross_checks(spec, doc, overridden)
        if extra is not None:
            issues += [_problem_issue(p, doc, overridden) for p in extra(spec)]
    if issues:
        raise SpecError(file, _dedupe(issues))
    assert spec is not None
    return spec


def problem_issues(source: SpecSource, problems: list[Problem]) -> list[SpecIssue]:
    """Problems found after validation (preflight's cluster checks) as issues with the spec's file and lines."""
    doc, _ = specfile.parse_yaml(source.text, source.path)
    if doc is None:
        return [SpecIssue(source.path, None, p.key, p.message, p.got, p.expected, p.hint) for p in problems]
    overridden = _apply_overrides(doc, source.overrides, [])
    return _dedupe([_problem_issue(p, doc, overridden) for p in problems])
def _resolve_array_tasks(spec: JobSpec, base_dir: Path) -> JobSpec:
    """`array.tasks` values of path fields resolved as the task's own are (relative to the spec's folder,
    `~` and `${VAR}` expanded), so a sweep over data files or DeepSpeed configs means the same files on the
    login node and on the nodes. An override that does not validate is kept as written (reported elsewhere)."""
    if spec.array is None or not spec.array.tasks:
        return spec
    resolved = []
    for overrides in spec.array.tasks:
        data = spec.task.model_dump(mode="json")
        for key, value in overrides.items():
            specfile.apply_override(data, str(key).split("."), value)
        try:
            task = TASK_ADAPTER.validate_python(data, context={"base_dir": base_dir}).model_dump(mode="json")
        except ValidationError:
            resolved.append(overrides)
            continue
        resolved.append({key: _dotted(task, str(key), value) for key, value in overrides.items()})
    return spec.model_copy(update={"array": spec.array.model_copy(update={"tasks": resolved})})


def _dotted(data: Any, key: str, default: Any) -> Any:
    """data[a][b] for key 'a.b', or `default` where the path does not exist."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def _dedupe(issues: list[SpecIssue]) -> list[SpecIssue]:
    """Drop repeats; order by file position (issues without a line first, --set ones last)."""
    unique = list(dict.fromkeys(issues))
    return sorted(unique, key=lambda i: (i.file.startswith("--set"), i.line or 0))


def _apply_overrides(doc: YamlDoc, overrides: tuple[str, ...], issues: list[SpecIssue]) -> dict[Loc, str]:
    overridden: dict[Loc, str] = {}
    for text in overrides:
        try:
            keys, value = specfile.parse_override(text)
        except ValueError as e:
            issues.append(SpecIssue(f"--set {text}", None, "", str(e)))
            continue
        specfile.apply_override(doc.data, keys, value)
        overridden[tuple(keys)] = text
    return overridden


def _check_env(doc: YamlDoc, env: Any, issues: list[SpecIssue]) -> None:
    if not isinstance(env, dict):
        return
    for key in env:
        if SECRET_RE.search(str(key)):
            issues.append(SpecIssue(doc.file, doc.line_of(("env", key)), f"env.{key}",
                                    "looks like a secret; secrets must not be written into specs or scripts",
                                    hint=f"export {key} in the shell you submit from; Slurm passes it to the job"))


def _cross_checks(spec: JobSpec, doc: YamlDoc, overridden: dict[Loc, str]) -> list[SpecIssue]:
    problems: list[Problem] = []
    r, a = spec.resources, spec.array
    if spec.gpus_per_node > spec.cluster.gpus_per_node and spec.cluster.gpus_per_node > 0:
        problems.append(Problem("resources.gpus_per_node", f"asks for {spec.gpus_per_node} GPUs per node but a node of "
                                f"profile '{spec.cluster.profile}' has {spec.cluster.gpus_per_node}",
                                got=str(spec.gpus_per_node), expected=f"<= {spec.cluster.gpus_per_node}"))
    if spec.requeue.enabled and spec.requeue.signal_lead_s >= r.time_limit_min * 60:
        problems.append(Problem("requeue.signal_lead_s", f"the signal ({spec.requeue.signal_lead_s} s before the end) "
                                f"must come inside the time limit ({r.time_limit_min} min = {r.time_limit_min * 60} s)",
                                got=str(spec.requeue.signal_lead_s), expected=f"< {r.time_limit_min * 60}",
                                hint="raise resources.time_limit_min or lower requeue.signal_lead_s"))
    problems += _watchdog_checks(spec.watchdog)
    if a is not None:
        problems += _array_checks(spec, a)
    problems += _dependency_checks(spec)
    problems += spec.task.check(spec)
    problems += _container_checks(spec)
    for i in range(len(a.tasks) if a is not None else 0):
        try:
            task = spec.task_for(i)
        except ValidationError:
            continue  # already reported by _array_checks
        problems += [Problem(f"array.tasks[{i}]." + p.key.removeprefix("task."), p.message, p.got, p.expected,
                             p.hint) for p in task.check(spec)]
    return [_problem_issue(p, doc, overridden) for p in problems]


def _watchdog_checks(w: Watchdog) -> list[Problem]:
    """The watcher must look more often than the allowances it enforces, and a save may take longer than a step."""
    if not w.enabled:
        return []
    problems = []
    for key in ("hang_timeout_s", "startup_timeout_s", "save_timeout_s"):
        value = getattr(w, key)
        if w.poll_interval_s >= value:
            problems.append(Problem(f"watchdog.{key}", f"({value} s) must be longer than watchdog.poll_interval_s "
                                    f"({w.poll_interval_s:g} s): the watcher looks every poll_interval_s",
                                    got=str(value), expected=f"> {w.poll_interval_s:g}",
                                    hint="raise the timeout or lower watchdog.poll_interval_s"))
    if w.save_timeout_s < w.hang_timeout_s:
        problems.append(Problem("watchdog.save_timeout_s", f"({w.save_timeout_s} s) must be at least "
                                f"watchdog.hang_timeout_s ({w.hang_timeout_s} s): the save phase extends the allowance",
                                got=str(w.save_timeout_s), expected=f">= {w.hang_timeout_s}"))
    return problems


def _container_checks(spec: JobSpec) -> list[Problem]:
    """Every path the job touches can be mounted into the profile's container (none: nothing to check)."""
    from hpcqwen.containers import container_problems

    return container_problems(spec)


def _dependency_checks(spec: JobSpec) -> list[Problem]:
    """Each dependency is a Slurm job id (digits, optional _index) or a path to a run dir."""
    problems = []
    for i, dep in enumerate(spec.depends_on):
        if JOB_ID_RE.fullmatch(dep.job):
            continue
        why = "is neither a job id nor a run dir path"
        if "/" in dep.job or dep.job.startswith("."):
            try:
                check_path_shape(dep.job)
                continue
            except ValueError as e:
                why = str(e)
        problems.append(Problem(f"depends_on[{i}].job", why, got=specfile._short(dep.job),
                                expected="123, 123_4, afterok:123 or a path to a run dir"))
    return problems


def _array_checks(spec: JobSpec, a: ArraySpec) -> list[Problem]:
    problems = []
    if a.size is None and not a.tasks:
        problems.append(Problem("array", "needs `size:` or a list of `tasks:`", expected="size: N or tasks: [...]"))
    if a.size is not None and a.tasks and a.size != len(a.tasks):
        problems.append(Problem("array.size", f"is {a.size} but array.tasks lists {len(a.tasks)} tasks",
                                got=str(a.size), expected=str(len(a.tasks)), hint="drop size: or make them agree"))
    if a.throttle is not None and a.count and a.throttle > a.count:
        problems.append(Problem("array.throttle", f"is larger than the array ({a.throttle} > {a.count} tasks)",
                                got=str(a.throttle), expected=f"<= {a.count}"))
    for i, overrides in enumerate(a.tasks):
        data = spec.task.model_dump(mode="json")
        for key, value in overrides.items():
            specfile.apply_override(data, str(key).split("."), value)
        try:
            TASK_ADAPTER.validate_python(data)
        except ValidationError as e:
            for err in e.errors():
                loc = tuple(err["loc"])[1:] if err["loc"] and err["loc"][0] == data.get("kind") else tuple(err["loc"])
                issue = specfile.issue_from_error(err, ("array", "tasks", i, *loc), "", None, None)
                problems.append(Problem(issue.key, issue.message, issue.got, issue.expected, issue.hint))
    return problems


def _problem_issue(p: Problem, doc: YamlDoc, overridden: dict[Loc, str]) -> SpecIssue:
    loc: Loc = tuple(int(x) if x.isdigit() else x for x in re.split(r"\.|\[|\]\.?", p.key) if x)
    for path, flag in overridden.items():
        if loc[: len(path)] == path:
            return SpecIssue(f"--set {flag}", None, p.key, p.message, p.got, p.expected, p.hint)
    return SpecIssue(doc.file, doc.line_of(loc), p.key, p.message, p.got, p.expected, p.hint)


def read_frozen_spec(path: str | Path) -> JobSpec:
    """Read the resolved `spec.json` of a run dir (on the node). No defaults are re-resolved."""
    return JobSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))


def task_kinds() -> list[str]:
    """The task kinds this hpcqwen knows."""
    return sorted(TASK_KINDS)
