"""`report_to` in specs and where each tracker writes (issue 13 item 19); credentials stay out of specs,
profiles, scripts and run dirs. The real runs are tests/cpu_train/test_tracking.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen.errors import SpecError
from hpcqwen.paths import RunPaths
from hpcqwen.render import render_sbatch
from hpcqwen.spec import parse_spec, read_source
from hpcqwen.tracking import apply_tracking_env, hf_report_to, tracking_env

REPO = Path(__file__).resolve().parents[2]


def _sft(write_spec, model: Path, report_to: str | None) -> Path:
    line = f", report_to: {report_to}" if report_to is not None else ""
    return write_spec(f"name: t\ntask: {{kind: sft, model: {model}, dataset: [{REPO}/jobspecs/data/sft-tiny.jsonl]"
                      f"{line}}}\n")


@pytest.mark.parametrize(("value", "expected"), [(None, ["tensorboard"]), ("wandb", ["wandb"]), ("none", ["none"]),
                                                 ("[mlflow, tensorboard, wandb]", ["mlflow", "tensorboard", "wandb"])])
def test_report_to_forms(write_spec, tiny_qwen3_dir: Path, value: str | None, expected: list[str]) -> None:
    spec = parse_spec(read_source(_sft(write_spec, tiny_qwen3_dir, value)))
    assert spec.task.report_to == expected
    assert hf_report_to(spec.task.report_to) == ([r for r in expected if r != "none"] or ["none"])


@pytest.mark.parametrize(("value", "message"), [("[none, wandb]", "'none' turns tracking off"),
                                                ("[wandb, wandb]", "names a tracker twice"),
                                                ("[]", "needs at least one entry"), ("comet", "tensorboard")])
def test_bad_report_to_is_one_clear_error(write_spec, tiny_qwen3_dir: Path, value: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(_sft(write_spec, tiny_qwen3_dir, value)))
    (issue,) = info.value.issues
    assert issue.key.startswith("task.report_to") and message in issue.message + issue.expected and issue.line == 2


def test_where_each_tracker_writes_and_what_the_user_set_wins(tmp_path: Path) -> None:
    run_dir = tmp_path / "20260101T000000Z-abcdef"
    env = tracking_env(["wandb", "mlflow", "tensorboard"], "sweep", run_dir, run_dir / "tasks" / "3", 3, "77_3", {})
    assert env["TENSORBOARD_LOGGING_DIR"] == str(run_dir / "tasks" / "3" / "tensorboard")
    assert (env["WANDB_MODE"], env["WANDB_DIR"], env["WANDB_NAME"], env["WANDB_RUN_ID"], env["WANDB_TAGS"]) == (
        "offline", str(run_dir / "tasks" / "3"), "sweep-task3", "20260101T000000Z-abcdef-3", "slurm-job-77_3")
    assert env["MLFLOW_TRACKING_URI"] == f"file:{run_dir / 'tasks' / '3' / 'mlruns'}"
    assert json.loads(env["MLFLOW_TAGS"]) == {"hpcqwen.job_id": "77_3", "hpcqwen.run_dir": str(run_dir),
                                              "hpcqwen.array_index": "3"}
    mine = {"WANDB_MODE": "online", "MLFLOW_TRACKING_URI": "http://mlflow.site:5000", "WANDB_PROJECT": "p"}
    env = tracking_env(["wandb", "mlflow"], "sweep", run_dir, run_dir, None, "77", mine)
    assert not set(mine) & set(env) and "MLFLOW_ALLOW_FILE_STORE" not in env  # a server: no file-store opt-in
    (run_dir / ".mlflow-run-id").parent.mkdir(parents=True)
    (run_dir / ".mlflow-run-id").write_text("0123abcd\n")
    assert tracking_env(["mlflow"], "s", run_dir, run_dir, None, "78", {})["MLFLOW_RUN_ID"] == "0123abcd"


def test_the_wandb_key_is_dropped_offline_and_kept_online(tmp_path: Path) -> None:
    environ = {"WANDB_API_KEY": "k", "HPCQWEN_JOB_ID": "5", "HPCQWEN_ARRAY_TASK_ID": ""}
    assert apply_tracking_env(["wandb"], "s", tmp_path, tmp_path, environ) == "s"
    assert "WANDB_API_KEY" not in environ and environ["WANDB_TAGS"] == "slurm-job-5"
    environ = {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}
    apply_tracking_env(["wandb"], "s", tmp_path, tmp_path, environ)
    assert environ["WANDB_API_KEY"] == "k"


@pytest.mark.parametrize("where", ["profile", "spec-cluster", "set"])
def test_a_secret_in_the_cluster_env_is_refused(write_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                where: str) -> None:
    (tmp_path / "profiles").mkdir()
    profile_env = "env: {WANDB_API_KEY: abc123}\n" if where == "profile" else ""
    (tmp_path / "profiles" / "site.yaml").write_text(f"partition: debug\n{profile_env}")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))
    cluster = "{profile: site, env: {WANDB_API_KEY: abc123}}" if where == "spec-cluster" else "site"
    sets = ("cluster.env.HF_TOKEN=abc123",) if where == "set" else ()
    source = read_source(write_spec(f"name: t\ncluster: {cluster}\ntask: {{kind: command, module: m}}\n"), sets)
    with pytest.raises(SpecError) as info:
        render_sbatch(parse_spec(source), RunPaths(tmp_path / "r"), source)
    (issue,) = info.value.issues
    assert "looks like a secret" in issue.message and "export" in issue.message + issue.hint
