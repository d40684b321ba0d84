"""Files a spec names by path that the nodes read at run time (issue 13 item 14): reward plugin files and
DeepSpeed configs are copied into the run dir at submit, hashed in the manifest, and the nodes load the
copies; `hpcqwen render` checks plugins without importing them; a DeepSpeed value is a preset or an
existing file, whatever its name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_USAGE
from hpcqwen.spec import parse_spec, read_frozen_spec, read_source
from hpcqwen.submit import prepare_run_dir

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "jobspecs" / "data" / "math-tiny.jsonl"
GOOD = "def score(completions, **kwargs):\n    return [{value}] * len(completions)\n"
SIDE_EFFECT = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"


def _grpo(write_spec, model: Path, rewards: str, extra: str = "") -> Path:
    extra = extra.replace("\n", "\n        ")  # the dedent below needs every line at the template's indent
    return write_spec(f"""
        name: inputs14
        task:
          kind: grpo
          model: {model}
          dataset: {DATA}
          reward_funcs: {rewards}
          num_generations: 2
          per_device_train_batch_size: 2
        {extra}
    """)


def test_render_checks_a_plugin_without_importing_it(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "score.py").write_text(SIDE_EFFECT.format(marker=str(marker)) + GOOD.format(value=1.0))
    spec = _grpo(write_spec, tiny_qwen3_dir, "[accuracy, score.py:score]")
    assert main(["render", str(spec)]) == EXIT_OK
    assert not marker.exists(), "render ran the plugin's code"


@pytest.mark.parametrize(("body", "ref", "problem"), [
    (None, "missing.py:score", "file {dir}/missing.py does not exist"),
    ("def score(completions, **kwargs):\n    return [\n", "score.py:score", "syntax error in {dir}/score.py:4"),
    (GOOD.format(value=1.0), "score.py:scroe", "has no function 'scroe'; did you mean 'score'?"),
    ("def score(completions, solution):\n    return []\n", "score.py:score", "score() has no **kwargs"),
    ("def score(completions, answer_key, **kwargs):\n    return []\n", "score.py:score",
     "required parameter 'answer_key' is not a dataset column"),
    ("def score(completions, /, **kwargs):\n    return []\n", "score.py:score",
     "parameter 'completions' is positional-only"),
    ("class Score:\n    pass\n", "score.py:Score", "'Score' is a class"),
    (GOOD.format(value=1.0), "no_such_module_14.sub:score", "module no_such_module_14.sub is not installed"),
])
def test_render_refuses_a_bad_plugin_without_importing_it(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                          capsys: pytest.CaptureFixture[str], body: str | None,
                                                          ref: str, problem: str) -> None:
    marker = tmp_path / "imported"
    if body is not None:
        (tmp_path / "score.py").write_text(SIDE_EFFECT.format(marker=str(marker)) + body)
    spec = _grpo(write_spec, tiny_qwen3_dir, f"[accuracy, '{ref}']")
    assert main(["render", str(spec)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "task.reward_funcs[1]: " in err and problem.format(dir=tmp_path) in err, err
    assert not marker.exists(), "render ran the plugin's code"


def test_submit_copies_plugins_and_deepspeed_files_and_the_nodes_load_the_copies(
        write_spec, tmp_path: Path, tiny_qwen3_dir: Path, run_root: Path) -> None:
    (tmp_path / "score.py").write_text(GOOD.format(value=1.0))
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "comment": "mine"}
    (tmp_path / "ds-config").write_text(json.dumps(ds))  # no .json: before, silently the ZeRO-3 preset
    source = read_source(_grpo(write_spec, tiny_qwen3_dir, "[accuracy, score.py:score]", "  deepspeed: ds-config"))
    paths = prepare_run_dir(parse_spec(source), source, "slurm", {})
    (tmp_path / "score.py").write_text(GOOD.format(value=-5.0))  # changed after submit: the run must not see it
    (tmp_path / "ds-config").write_text("{}")
    frozen = read_frozen_spec(paths.spec_json)
    plugin, ds_copy = frozen.task.reward_funcs[1].rpartition(":")[0], frozen.task.deepspeed
    assert Path(plugin).parent == Path(ds_copy).parent == paths.root / "inputs"
    manifest = json.loads(paths.manifest.read_text())["inputs"]
    by_key = {m["key"]: m for m in manifest}
    assert by_key["task.deepspeed"]["source"] == str(tmp_path / "ds-config")
    assert by_key["task.deepspeed"]["sha256"] == hashlib.sha256(Path(ds_copy).read_bytes()).hexdigest()
    assert by_key["task.reward_funcs[1]"]["sha256"] == hashlib.sha256(
        GOOD.format(value=1.0).encode()).hexdigest()
    assert not Path(plugin).stat().st_mode & 0o222  # the copies are read-only
    # what the GRPO runner does on the node, from the frozen spec
    from transformers import TrainingArguments

    from hpcqwen.rewards import resolve_rewards
    from hpcqwen.runners.trainer_args import shared_training_kwargs

    (_, fn), = [r for r in resolve_rewards(frozen.task.reward_funcs, "/") if r[0] != "accuracy"]
    assert fn(completions=["a", "b"]) == [1.0, 1.0]
    assert shared_training_kwargs(frozen.task, TrainingArguments, "/o", False)["deepspeed"] == ds


def test_array_task_overrides_are_resolved_against_the_spec_and_copied(write_spec, tmp_path: Path,
                                                                       tiny_qwen3_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for i in (1, 2):
        (tmp_path / f"ds{i}.json").write_text(json.dumps({"zero_optimization": {"stage": i}}))
        (tmp_path / f"r{i}.py").write_text(GOOD.format(value=float(i)))
    spec_file = _grpo(write_spec, tiny_qwen3_dir, "[accuracy]",
                      "array:\n  tasks: [{deepspeed: ds1.json, reward_funcs: [r1.py:score]},\n"
                      "          {deepspeed: ds2.json, reward_funcs: [r2.py:score]}]")
    monkeypatch.chdir("/")  # relative paths belong to the spec's folder, never to where hpcqwen runs
    source = read_source(spec_file)
    paths = prepare_run_dir(parse_spec(source), source, "slurm", {})
    frozen = read_frozen_spec(paths.spec_json)
    for i in (0, 1):
        task = frozen.task_for(i)
        assert json.loads(Path(task.deepspeed).read_text()) == {"zero_optimization": {"stage": i + 1}}
        assert Path(task.reward_funcs[0].rpartition(":")[0]).read_text() == GOOD.format(value=float(i + 1))
        assert Path(task.deepspeed).parent == paths.root / "inputs"
    keys = {m["key"] for m in json.loads(paths.manifest.read_text())["inputs"]}
    assert keys == {"array.tasks[0].deepspeed", "array.tasks[1].deepspeed", "array.tasks[0].reward_funcs[0]",
                    "array.tasks[1].reward_funcs[0]"}


@pytest.mark.parametrize(("value", "files", "problem"), [
    ("zero9", [], "is neither a preset (zero2, zero3, zero3_offload) nor an existing file"),
    ("configs/ds.json", [], "is neither a preset (zero2, zero3, zero3_offload) nor an existing file"),
    ("zero3", ["zero3"], "names both the preset zero3 and the file"),
    ("ds.json", ["ds.json"], "is not a JSON object"),
])
def test_deepspeed_is_a_preset_or_an_existing_file(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                   value: str, files: list[str], problem: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for name in files:
        (tmp_path / name).write_text("[1, 2]")
    spec = _grpo(write_spec, tiny_qwen3_dir, "[accuracy]", f"  deepspeed: {value}")
    assert main(["render", str(spec)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "task.deepspeed: " in err and problem in err and f"{spec}:" in err, err
