"""Values that must be refused: non-finite and out-of-range numbers and booleans in every numeric field
of every model, empty or null sections, and environment values that YAML would retype."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from hpcqwen.cluster import ClusterProfile
from hpcqwen.errors import SpecError
from hpcqwen.paths import RunPaths
from hpcqwen.render import render_sbatch
from hpcqwen.spec import ArraySpec, Requeue, Resources, load_spec, parse_spec, read_source
from hpcqwen.tasks import TASK_KINDS


def _numeric(annotation: object) -> tuple[str, bool] | None:
    """('int' | 'float', inside a list) for a numeric field's annotation, else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is int or annotation is float:
        return annotation.__name__, False  # type: ignore[union-attr]
    if origin is typing.Annotated:
        return _numeric(args[0])
    if origin in (typing.Union, types.UnionType):
        return next((k for a in args if (k := _numeric(a))), None)
    if origin is list and args:
        inner = _numeric(args[0])
        return (inner[0], True) if inner else None
    return None


def _fields(prefix: str, model: type[BaseModel]) -> list[tuple[str, str, bool]]:
    out = []
    for name, info in model.model_fields.items():
        found = _numeric(info.annotation)
        if found:
            out.append((f"{prefix}.{name}", *found))
    return out


SECTIONS = {"resources": Resources, "array": ArraySpec, "requeue": Requeue, "cluster": ClusterProfile}
FIELDS = [(None, *f) for prefix, model in SECTIONS.items() for f in _fields(prefix, model)]
FIELDS += [(kind, *f) for kind, model in sorted(TASK_KINDS.items()) for f in _fields("task", model)]
PROBES = {  # YAML text -> what the error says
    "int": {"true": "must be a whole number", "18446744073709551617": "must be <", "1e30": "must be a whole number",
            "2.0": "must be a whole number", "'3'": "must be a whole number"},
    "float": {".inf": "must be a finite number", "-.inf": "must be a finite number", ".nan": "must be a finite number",
              "1e300": "must be <", "true": "must be a number", "'0.5'": "must be a number"},
}


def test_the_probe_finds_the_numeric_fields() -> None:
    keys = {f[1] for f in FIELDS}
    assert {"resources.nodes", "resources.mem_gb", "resources.time_limit_min", "cluster.gpus_per_node",
            "task.learning_rate", "task.seed", "task.reward_weights", "task.lr", "task.sleep_level"} <= keys
    assert len(FIELDS) > 100


@pytest.mark.parametrize(("kind", "key", "number", "in_list"), FIELDS,
                         ids=[f"{k or 'spec'}:{key}" for k, key, _, _ in FIELDS])
def test_every_numeric_field_is_strict_finite_and_bounded(tmp_path: Path, kind: str | None, key: str, number: str,
                                                          in_list: bool) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\ntask: {{kind: {kind or 'command'}}}\n")
    for value, says in PROBES[number].items():
        override = f"{key}=[{value}]" if in_list else f"{key}={value}"
        with pytest.raises(SpecError) as info:
            parse_spec(read_source(spec, (override,)))
        ours = [i for i in info.value.issues if i.key == key + ("[0]" if in_list else "")]
        assert ours and says in ours[0].message, (override, [i.render() for i in info.value.issues])
        assert ours[0].file == f"--set {override}"


def test_time_limit_and_memory_render_sane_values(write_spec) -> None:
    base = "name: t\ntask: {kind: command, module: m}\nresources: {%s}\n"
    for bad, says in (("time_limit_min: 1e30", "must be a whole number"), ("time_limit_min: 600000", "<= 527040"),
                      ("mem_gb: 1e-9", ">= 0.001"), ("nodes: true", "must be a whole number")):
        with pytest.raises(SpecError) as info:
            load_spec(write_spec(base % bad))
        assert says in info.value.render(), bad
    spec = load_spec(write_spec(base % "mem_gb: 0.0015, time_limit_min: 527040"))
    script = render_sbatch(spec, RunPaths(Path("/runs/x")), read_source(write_spec(base % "mem_gb: 0.0015")))
    assert "#SBATCH --mem=2M" in script and "#SBATCH --time=366-00:00:00" in script  # never --mem=0 (whole node)


@pytest.mark.parametrize("section", ["resources: []", "resources:", "resources: ~", "requeue:", "requeue: []",
                                     "env:", "env: []", "array: []", "depends_on:", "depends_on: {}"])
def test_empty_or_null_sections_are_refused(write_spec, tiny_qwen3_dir: Path, data_dir: Path, section: str) -> None:
    # a distill task on a GPU profile derives resources.nproc_per_node: it must not replace `resources: []` with it
    text = (f"name: t\ncluster: h100-8x\n{section}\ntask:\n  kind: distill\n  infer_backend: hf\n"
            f"  model: {tiny_qwen3_dir}\n  dataset: {data_dir}/sft-tiny.jsonl\n")
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(text))
    key = section.split(":")[0]
    assert any(i.key.startswith(key) and i.line == 3 for i in info.value.issues), info.value.render()


def test_env_values_are_the_text_as_written(write_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "site.yaml").write_text("partition: debug\nenv: {OMP_NUM_THREADS: 08, IB: off}\n")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))
    spec = load_spec(write_spec("name: t\ncluster: site\ntask: {kind: command, module: m}\n"
                                "env:\n  OCT: 010\n  SW: on\n  F: 1.50\n  D: 2001-01-01\n  E: 1e3\n  Q: '7'\n"),
                     ["env.SET=0x1F"])
    assert spec.env == {"OCT": "010", "SW": "on", "F": "1.50", "D": "2001-01-01", "E": "1e3", "Q": "7", "SET": "0x1F"}
    assert spec.cluster.env == {"OMP_NUM_THREADS": "08", "IB": "off"}


@pytest.mark.parametrize(("value", "says"), [("", "has no value"), ("~", "has no value"), ("[a]", "must be a string"),
                                             ("{a: 1}", "must be a string")])
def test_env_values_without_text_are_refused_with_a_hint(write_spec, value: str, says: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(f"name: t\ntask: {{kind: command, module: m}}\nenv:\n  NCCL_DEBUG: {value}\n"))
    (issue,) = info.value.issues
    assert (issue.line, issue.key) == (4, "env.NCCL_DEBUG") and says in issue.message
    if says == "has no value":
        assert 'NCCL_DEBUG: ""' in issue.hint
