"""Pipeline files: stages, edges and `${stages...}` references checked on submit, each error at its line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_USAGE, SpecError
from hpcqwen.pipeline.definition import load_pipeline
from hpcqwen.pipeline.outputs import resolve_on_node
from hpcqwen.pipeline.record import StageRecord, new_record, write_record
from hpcqwen.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
CMD = "{task: {kind: command, module: hpcqwen.examples.steps}}"


def _pipeline(write_spec, stages: str, name: str = "p.yaml") -> Path:
    return write_spec(f"name: pl\nstages:\n{stages}", name)


def _errors(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    return [i.render().replace(str(path), "f") for i in info.value.issues]


def test_the_shipped_pipelines_load_in_order(hub_ids_cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    tiny = load_pipeline(REPO / "pipelines" / "qwen3-tiny-reasoning.yaml")
    assert list(tiny.stages) == ["prepare", "distill", "merge", "sft", "grpo", "export", "eval"]
    assert tiny.stages["sft"].refs == (("prepare", "run_dir"), ("distill", "result_path"))
    assert ("afterok", "distill") in tiny.stages["sft"].after and tiny.stages["distill"].spec.array.count == 3
    assert tiny.stages["grpo"].spec.task.model == "${stages.sft.export}"  # kept for the node
    guide = load_pipeline(REPO / "pipelines" / "qwen3-reasoning.yaml")
    assert list(guide.stages) == ["distill", "merge", "sft", "grpo", "export"]
    assert guide.stages["sft"].spec.task.dataset[0] == "${stages.distill.result_path}"
    assert guide.stages["sft"].spec.task.model == "Qwen/Qwen3-8B" and guide.stages["distill"].spec.array.count == 4
    assert time.monotonic() - start < 5


def test_references_name_a_stage_an_output_it_has_and_no_cycle(write_spec) -> None:
    path = _pipeline(write_spec, f"""\
  a:
    spec: {CMD}
  b:
    spec: {{task: {{kind: command, module: m, args: ["${{stages.nope.run_dir}}", "${{stages.a.checkpoint}}"]}}}}
  c:
    spec: {{task: {{kind: command, module: m, args: ["${{stages.a.run-dir}}"]}}}}
""")
    assert _errors(path) == [
        "f:8: [c] task.args[0]: is not a stage reference (got '${stages.a.run-dir}'; expected "
        "${stages.<stage>.<output>}) — outputs: run_dir, result_path, checkpoint, export",
    ]
    path.write_text(path.read_text().replace('"${stages.a.run-dir}"', '"${stages.c.run_dir}"'))
    assert _errors(path) == [
        "f:6: [b] ${stages.nope.run_dir}: there is no stage 'nope' (expected one of a, c)",
        "f:6: [b] ${stages.a.checkpoint}: stage a (command) has no output 'checkpoint' (expected one of run_dir)",
        "f:8: [c] ${stages.c.run_dir}: a stage cannot use its own output (expected one of a, b)",
    ]


def test_a_cycle_is_refused(write_spec) -> None:
    path = _pipeline(write_spec, f"""\
  a: {{spec: {CMD}, after: [c]}}
  b: {{spec: {CMD}, after: [a]}}
  c: {{spec: {{task: {{kind: command, module: m, args: ["${{stages.b.run_dir}}"]}}}}}}
""")
    assert _errors(path) == ["f:3: stages: the stages wait for each other in a cycle: a -> c -> b -> a — a stage "
                             "can only use outputs of stages that run before it"]


def test_stage_spec_errors_point_into_the_pipeline_or_the_spec_file(write_spec, tmp_path: Path) -> None:
    spec = write_spec("name: s\nresources: {nodes: 0}\ntask: {kind: command, module: m}\n", "stage.yaml")
    path = _pipeline(write_spec, """\
  inline:
    spec:
      task: {kind: command, module: "no way"}
  file:
    spec: stage.yaml
    set: {resources.time_limit_min: -1}
""")
    assert _errors(path) == [
        "f:5: [inline] task.module: has characters that are not allowed (got 'no way'; expected text matching "
        "^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*$)",
        f"{spec}:2: [file] resources.nodes: must be >= 1 (got 0; expected >= 1)",
        "f:8: [file] resources.time_limit_min: must be >= 1 (got -1; expected >= 1)",
    ]


def test_a_reference_outside_a_pipeline_is_a_spec_error(write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec("name: s\ntask: {kind: sft, model: '${stages.sft.export}', dataset: [x.jsonl]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [i.render().replace(str(path), "f") for i in info.value.issues] == [
        "f:2: task.model: refers to a pipeline stage, which only a stage of a pipeline file can (got "
        "'${stages.sft.export}') — submit it with `hpcqwen pipeline submit PIPELINE.yaml`"]
    assert main(["render", str(path)]) == EXIT_USAGE


def test_the_node_resolves_references_into_spec_json(write_spec, tmp_path: Path) -> None:
    pdir = tmp_path / "pl" / "20260101T000000Z-abcdef"
    producer, consumer = pdir / "stages" / "a", pdir / "stages" / "b"
    for d in (producer, consumer):
        d.mkdir(parents=True)
    spec = load_spec(write_spec('name: b\ntask: {kind: command, module: m, args: ["${stages.a.run_dir}/model"]}\n'),
                     stage_refs=True)
    (producer / "spec.json").write_text(spec.model_dump_json())
    (consumer / "spec.json").write_text(spec.model_dump_json())
    write_record(pdir, new_record("pl", "p.yaml", "0" * 64, {
        "a": StageRecord(str(producer), "command", [], []),
        "b": StageRecord(str(consumer), "command", [["afterok", "a"]], [["a", "run_dir"]])}))
    resolve_on_node(consumer, {"SLURM_NODEID": "0"})
    resolved = JobSpec.model_validate_json((consumer / "spec.json").read_text())
    assert resolved.task.args == [f"{producer}/model"]
    assert json.loads((consumer / "inputs.json").read_text()) == {"${stages.a.run_dir}": str(producer)}
    assert "${stages.a.run_dir}" in (consumer / "spec.unresolved.json").read_text()
    resolve_on_node(consumer, {"SLURM_NODEID": "1"})  # resolved already: returns at once
