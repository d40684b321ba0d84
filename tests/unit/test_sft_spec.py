"""SFT/Megatron data knobs in the job spec: defaults stated in the schema, subsets checked on submit,
and a warning (not an error) when evaluation is configured but has nothing to evaluate."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.spec import load_spec
from hpcqwen.tasks import SftTask, spec_warnings

REPO = Path(__file__).resolve().parents[2]


def _sft(write_spec, model: Path, data: Path, **task: object) -> Path:  # noqa: ANN001
    lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in task.items())
    return write_spec(textwrap.dedent(f"""
        name: sft-knobs
        cluster: local
        resources: {{nodes: 1, nproc_per_node: 1, time_limit_min: 5}}
        task:
          kind: sft
          model: {model}
          dataset: {data}/self-cognition.jsonl:qwen3#8
          model_name: bot
          model_author: lab
        """).lstrip("\n") + lines)


def test_schema_states_the_defaults_of_the_data_knobs() -> None:
    fields = SftTask.model_fields
    assert fields["truncation_strategy"].default == "delete"
    assert "delete (default, as ms-swift)" in str(fields["truncation_strategy"].description)
    assert fields["multi_turn"].default == "all_rounds"
    assert "all_rounds (default" in str(fields["multi_turn"].description)
    assert "last_round" in str(fields["multi_turn"].description)
    assert fields["chat_template"].default == "auto"
    assert "known Qwen3 revision" in str(fields["chat_template"].description)


def test_new_knobs_are_validated(write_spec, tiny_qwen3_dir: Path, data_dir: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = _sft(write_spec, tiny_qwen3_dir, data_dir, truncation_strategy="split", multi_turn="last")
    assert main(["render", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "task.truncation_strategy" in err and "task.multi_turn" in err and "'delete'" in err


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("{data}/self-cognition.jsonl:qwen4#8", "unknown subset 'qwen4' of the self-cognition dataset"),
        ("{data}/sft-tiny.jsonl:qwen3", "subset 'qwen3' given for the file"),
        ("{tmp}:nope", "no subfolder 'nope' in the dataset folder"),
    ],
)
def test_a_bad_subset_is_a_spec_error_on_submit(write_spec, tiny_qwen3_dir: Path, data_dir: Path, tmp_path: Path,
                                                run_root: Path, dataset: str, message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec = _sft(write_spec, tiny_qwen3_dir, data_dir)
    text = spec.read_text().replace(f"{data_dir}/self-cognition.jsonl:qwen3#8",
                                    dataset.format(data=data_dir, tmp=tmp_path))
    spec.write_text(text)
    assert main(["submit", str(spec), "--backend", "local"]) == 1
    err = capsys.readouterr().err
    line = next(i for i, x in enumerate(text.splitlines(), start=1) if "dataset:" in x)
    assert f"{spec}:{line}: task.dataset[0]: {message}" in err
    assert not any(run_root.iterdir())  # nothing written, nothing submitted


def test_the_guide_s_self_cognition_subset_validates(write_spec, tiny_qwen3_dir: Path, data_dir: Path) -> None:
    spec = load_spec(_sft(write_spec, tiny_qwen3_dir, data_dir))
    assert spec.task.dataset == [f"{data_dir}/self-cognition.jsonl:qwen3#8"]


def test_eval_without_anything_to_evaluate_warns_on_submit(write_spec, tiny_qwen3_dir: Path, data_dir: Path,
                                                           run_root: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    spec = _sft(write_spec, tiny_qwen3_dir, data_dir, eval_steps=100)
    warnings = spec_warnings(load_spec(spec))
    assert [w.key for w in warnings] == ["task.eval_steps"]
    # The warning goes to stderr before the backend runs; here the local backend then refuses the
    # dependency, so nothing is submitted and the exit code is the backend's error, not the warning's.
    spec.write_text(spec.read_text() + "depends_on: [12345]\n")
    assert main(["submit", str(spec), "--backend", "local"]) == 1
    err = capsys.readouterr().err
    assert f"warning: {spec}: task.eval_steps: evaluation is off: there is nothing to evaluate" in err
    assert "split_dataset_ratio" in err and "cannot wait for Slurm jobs" in err
    for fix in ({"split_dataset_ratio": 0.1}, {"val_dataset": f"{data_dir}/sft-tiny.jsonl"}, {}):
        ok = _sft(write_spec, tiny_qwen3_dir, data_dir, **({"eval_steps": 100, **fix} if fix else {}))
        assert spec_warnings(load_spec(ok)) == []


def test_megatron_eval_without_anything_to_evaluate_warns(write_spec, tiny_qwen3_dir: Path, data_dir: Path) -> None:
    base = textwrap.dedent(f"""
        name: mcore
        cluster: local
        resources: {{nodes: 1, gpus_per_node: 1, time_limit_min: 5}}
        task:
          kind: megatron
          load: {tiny_qwen3_dir}
          dataset: {data_dir}/sft-tiny.jsonl
          global_batch_size: 1
          train_iters: 10
        """).lstrip("\n")
    assert spec_warnings(load_spec(write_spec(base))) == []
    warned = spec_warnings(load_spec(write_spec(base + "  eval_interval: 10\n")))
    assert [w.key for w in warned] == ["task.eval_interval"]
    assert spec_warnings(load_spec(write_spec(base + "  eval_interval: 10\n  split_dataset_ratio: 0.1\n"))) == []


@pytest.mark.usefixtures("hub_ids_cached")  # offline, the hub ids must be in the cache
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobspecs").glob("*.yaml")))
def test_no_shipped_spec_configures_evaluation_without_data(name: str, tiny_qwen3_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TINY_MODEL", str(tiny_qwen3_dir))  # the tiny specs' model
    spec = load_spec(REPO / "jobspecs" / name)
    assert spec_warnings(spec) == []
