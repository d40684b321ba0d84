"""Pipeline files: named stages, each a job spec, with `after:` edges and references between them.

```yaml
name: qwen3-reasoning
cluster: h100-8x                 # the profile of every stage whose spec names none
stages:
  distill: {spec: ../jobspecs/qwen3-32b-distill.yaml, set: {task.shards: 8}}
  sft:
    spec: ../jobspecs/qwen3-8b-full-zero3.yaml
    set: {task.dataset: ["${stages.distill.result_path}", "swift/Qwen3-SFT-Mixin#2000"]}
  grpo: {spec: ../jobspecs/grpo.yaml, set: {task.model: "${stages.sft.export}"}, after: [sft]}
```
A stage's `spec` is a path (relative to the pipeline file) or an inline mapping; `set` overrides keys
as `--set` does; `after` lists stages to wait for (afterok; `afterany:<stage>` too). A reference
`${stages.<stage>.<output>}` adds an afterok edge to its producer. `load_pipeline` reads the file with
the bounded YAML reader, validates every stage (preflight's file checks included), checks every
reference (the stage exists, produces that output, no cycles) and returns the stages in an order
that submits producers first; every problem of every stage comes in one SpecError, each at the
line of the pipeline file (inline specs, `set:`) or of the stage's spec file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from hpcqwen import specfile, stagerefs, yamldoc
from hpcqwen.errors import SpecError, SpecIssue
from hpcqwen.fields import SPEC_CONFIG
from hpcqwen.spec import JobSpec, SpecSource, parse_spec, read_source

STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_STAGES = 64
ALL_KINDS = ("command", "distill", "grpo", "megatron", "sft")
OUTPUTS: dict[str, tuple[str, ...]] = {
    "run_dir": ALL_KINDS,  # the stage's run dir
    "result_path": ("distill",),  # the merged dataset
    "checkpoint": ("sft", "grpo", "megatron"),  # the newest complete checkpoint
    "export": ("sft", "grpo", "megatron"),  # a Hugging Face model of it (LoRA merged; Megatron converted)
}
EdgeType = Literal["afterok", "afterany"]


class StageDef(BaseModel):
    """One stage of a pipeline file."""

    model_config = SPEC_CONFIG
    spec: str | dict[str, Any] = Field(description="A job spec file (relative to the pipeline file), or inline.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides of the spec's keys (dotted), as --set.")
    after: list[str] = Field(default_factory=list, description="Stages to wait for: `name` (afterok) or "
                             "`afterany:name`.")


class PipelineDef(BaseModel):
    """A pipeline file."""

    model_config = SPEC_CONFIG
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Pipeline and pipeline-dir name.")
    cluster: str | dict[str, Any] | None = Field(None, description="Profile of stages whose spec names none.")
    stages: dict[str, StageDef] = Field(description="Stage name -> stage, in any order.")


@dataclass(frozen=True)
class Stage:
    """A validated stage."""

    name: str
    spec: JobSpec
    source: SpecSource
    inline: bool
    after: tuple[tuple[str, str], ...]  # (afterok | afterany, stage), references' producers included
    refs: tuple[tuple[str, str], ...]  # (stage, output)

    def remap(self, issues: list[SpecIssue], pdoc: yamldoc.YamlDoc) -> list[SpecIssue]:
        """Issues of this stage's spec, placed where the user wrote the key (see `_remap`)."""
        return [_remap(self.name, self.inline, i, pdoc) for i in issues]


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file: its stages, producers before consumers."""

    name: str
    path: Path
    text: str
    sha256: str
    stages: dict[str, Stage]
    doc: yamldoc.YamlDoc


def is_pipeline_file(path: str | Path) -> bool:
    """A YAML file whose top level has `stages:` (a job spec has `task:`)."""
    text, _ = yamldoc.read_text(Path(path))
    doc, _ = yamldoc.parse_yaml(text, str(path)) if text is not None else (None, [])
    return doc is not None and isinstance(doc.data, dict) and "stages" in doc.data


def load_pipeline(path: str | Path) -> Pipeline:
    """Read, validate and order a pipeline file; a SpecError lists every problem of every stage."""
    file = str(path)
    text, issues = yamldoc.read_text(Path(path))
    doc, parse_issues = specfile.parse_yaml(text, file) if text is not None else (None, issues)
    if doc is None or text is None:
        raise SpecError(file, parse_issues or issues)
    try:
        pdef = PipelineDef.model_validate(doc.data)
    except ValidationError as e:
        raise SpecError(file, specfile.issues_from_validation(e, PipelineDef, doc)) from None
    issues = _shape_issues(pdef, doc)
    stages: dict[str, Stage] = {}
    for name, sdef in pdef.stages.items():
        stage, found = _load_stage(name, sdef, pdef, doc, Path(file))
        issues += found
        if stage is not None:
            stages[name] = stage
    if not issues:
        stages, issues = _link(stages, pdef, doc)
    if issues:
        raise SpecError(file, issues)
    return Pipeline(pdef.name, Path(file).resolve(), text, hashlib.sha256(text.encode()).hexdigest(), stages, doc)


def _shape_issues(pdef: PipelineDef, doc: yamldoc.YamlDoc) -> list[SpecIssue]:
    out = []
    if not pdef.stages or len(pdef.stages) > MAX_STAGES:
        out.append(SpecIssue(doc.file, doc.line_of(("stages",)), "stages", f"needs 1 to {MAX_STAGES} stages",
                             got=str(len(pdef.stages))))
    for name in pdef.stages:
        if not re.fullmatch(STAGE_NAME_PATTERN, name):
            out.append(SpecIssue(doc.file, doc.line_of(("stages", name)), f"stages.{name[:40]}",
                                 "is not a stage name", expected="letters, digits, '_' or '-' (at most 64)"))
    return out


def _overrides(sdef: StageDef, pdef: PipelineDef, data: dict[str, Any] | None) -> tuple[str, ...]:
    """`set:` as --set texts (values as JSON, which YAML reads back as written; env values as text)."""
    out = []
    if pdef.cluster is not None and (data is None or "cluster" not in data) and "cluster" not in sdef.set:
        out.append(f"cluster={json.dumps(pdef.cluster)}")
    for key, value in sdef.set.items():
        keys = key.split(".")
        raw = value if isinstance(value, str) and (keys[0] == "env" or keys[:2] == ["cluster", "env"]) \
            else json.dumps(value)
        out.append(f"{key}={raw}")
    return tuple(out)


def _load_stage(name: str, sdef: StageDef, pdef: PipelineDef, pdoc: yamldoc.YamlDoc,
                pfile: Path) -> tuple[Stage | None, list[SpecIssue]]:
    from hpcqwen.preflight.files import file_problems

    inline = isinstance(sdef.spec, dict)
    data: dict[str, Any] | None
    try:
        if isinstance(sdef.spec, dict):
            data = {"name": f"{pdef.name}-{name}"[:64], **sdef.spec}
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
            source = SpecSource(str(pfile), text, hashlib.sha256(text.encode()).hexdigest(),
                                _overrides(sdef, pdef, data))
        else:
            spec_path = specfile.expand_path(sdef.spec, pfile.resolve().parent)
            raw = read_source(spec_path)
            head, _ = yamldoc.parse_yaml(raw.text, spec_path)
            data = head.data if head is not None and isinstance(head.data, dict) else None
            source = read_source(spec_path, _overrides(sdef, pdef, data))
        spec = parse_spec(source, file_problems, stage_refs=True)
    except SpecError as e:
        return None, [_remap(name, inline, i, pdoc) for i in e.issues]
    except ValueError as e:
        return None, [SpecIssue(pdoc.file, pdoc.line_of(("stages", name, "spec")), f"stages.{name}.spec", str(e))]
    refs = _refs_of(spec)
    stage = Stage(name, spec, source, inline, _edges(sdef.after), tuple(r for r, _ in refs if r[0]))
    return stage, _ref_syntax_issues(stage, refs, pdoc)


def _edges(after: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in after:
        kind, sep, stage = item.partition(":")
        out.append((kind, stage) if sep else ("afterok", item))
    return tuple(out)


def _refs_of(spec: JobSpec) -> list[tuple[tuple[str, str], tuple[tuple[str | int, ...], str]]]:
    """((stage, output), (where, text)) of every reference in the stage's spec (malformed ones as ('', text))."""
    out = []
    for loc, text in stagerefs.find_refs(spec.model_dump(mode="json", exclude={"cluster"})):
        good, bad = stagerefs.parse_refs(text)
        out += [(ref, (loc, text)) for ref in good] + [(("", b), (loc, text)) for b in bad]
    return out


def _ref_syntax_issues(stage: Stage, refs: list[Any], pdoc: yamldoc.YamlDoc) -> list[SpecIssue]:
    out = []
    for (producer, _), (loc, text) in refs:
        if not producer:
            issue = SpecIssue(stage.source.path, None, specfile.dotted_key(loc), "is not a stage reference",
                              got=specfile._short(text), expected="${stages.<stage>.<output>}",
                              hint=f"outputs: {', '.join(OUTPUTS)}")
            out.append(_remap(stage.name, stage.inline, issue, pdoc))
    return out


def _link(stages: dict[str, Stage], pdef: PipelineDef,
          pdoc: yamldoc.YamlDoc) -> tuple[dict[str, Stage], list[SpecIssue]]:
    """Check every edge and reference; add producers as afterok edges; order producers first."""
    issues: list[SpecIssue] = []
    linked = {}
    for name, stage in stages.items():
        edges = list(stage.after)
        for kind, other in stage.after:
            if kind not in ("afterok", "afterany") or other not in stages or other == name:
                issues.append(SpecIssue(pdoc.file, pdoc.line_of(("stages", name, "after")), f"stages.{name}.after",
                                        f"{kind}:{other} is not an earlier stage" if other not in stages or
                                        other == name else f"{kind} is not afterok or afterany",
                                        expected=f"one of {', '.join(s for s in stages if s != name)}"))
        for producer, output in stage.refs:
            issues += _ref_issues(stage, producer, output, stages, pdoc)
            if producer in stages and producer != name and all(o != producer for _, o in edges):
                edges.append(("afterok", producer))
        linked[name] = Stage(stage.name, stage.spec, stage.source, stage.inline, tuple(edges), stage.refs)
    if issues:
        return linked, issues
    order, cycle = _topological(linked)
    if cycle:
        return linked, [SpecIssue(pdoc.file, pdoc.line_of(("stages", cycle[0])), "stages", "the stages wait for "
                                  "each other in a cycle: " + " -> ".join([*cycle, cycle[0]]),
                                  hint="a stage can only use outputs of stages that run before it")]
    return {n: linked[n] for n in order}, []


def _ref_issues(stage: Stage, producer: str, output: str, stages: dict[str, Stage],
                pdoc: yamldoc.YamlDoc) -> list[SpecIssue]:
    where = (stage.source.path, None, f"${{stages.{producer}.{output}}}")
    if producer not in stages or producer == stage.name:
        why = "a stage cannot use its own output" if producer == stage.name else f"there is no stage {producer!r}"
        return [_remap(stage.name, stage.inline, SpecIssue(*where, why, expected=f"one of "
                       f"{', '.join(s for s in stages if s != stage.name)}"), pdoc)]
    kind = stages[producer].spec.task.kind
    if output not in OUTPUTS or kind not in OUTPUTS[output]:
        valid = [o for o, kinds in OUTPUTS.items() if kind in kinds]
        return [_remap(stage.name, stage.inline, SpecIssue(*where, f"stage {producer} ({kind}) has no output "
                       f"{output!r}", expected=f"one of {', '.join(valid)}"), pdoc)]
    if output in ("checkpoint", "export") and stages[producer].spec.array is not None:
        return [_remap(stage.name, stage.inline, SpecIssue(*where, f"stage {producer} is an array: it has one "
                       f"{output} per task", hint="reference a stage that is a single job"), pdoc)]
    return []


def _topological(stages: dict[str, Stage]) -> tuple[list[str], list[str]]:
    """(order, []) or ([], a cycle)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        if state.get(name) == 2:
            return []
        if state.get(name) == 1:
            return path[path.index(name):]
        state[name] = 1
        for _, other in stages[name].after:
            cycle = visit(other, [*path, name])
            if cycle:
                return cycle
        state[name] = 2
        order.append(name)
        return []

    for name in stages:
        cycle = visit(name, [])
        if cycle:
            return [], cycle
    return order, []


def _remap(stage: str, inline: bool, issue: SpecIssue, pdoc: yamldoc.YamlDoc) -> SpecIssue:
    """Place a stage's issue: `set:` overrides and inline specs at their line of the pipeline file."""
    key = f"[{stage}] {issue.key}" if issue.key else f"[{stage}]"
    if issue.file.startswith("--set "):
        name = issue.file.removeprefix("--set ").split("=", 1)[0]
        loc: tuple[str | int, ...] = ("stages", stage, "set", name) if name != "cluster" else ("cluster",)
        return SpecIssue(pdoc.file, pdoc.line_of(loc) or pdoc.line_of(("stages", stage)), key, issue.message,
                         issue.got, issue.expected, issue.hint)
    if inline:
        parts = tuple(int(x) if x.isdigit() else x for x in re.split(r"\.|\[|\]\.?", issue.key) if x)
        line = pdoc.line_of(("stages", stage, "spec", *parts)) or pdoc.line_of(("stages", stage))
        return SpecIssue(pdoc.file, line, key, issue.message, issue.got, issue.expected, issue.hint)
    return SpecIssue(issue.file, issue.line, key, issue.message, issue.got, issue.expected, issue.hint)
