"""Pipelines on the real local cluster: the tiny reasoning recipe end to end (CI), a submission that fails at
stage 3 leaving nothing queued, and a resume that redoes only what did not finish (or whose input changed)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen import slurm
from hpcqwen.backends import SlurmBackend
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_JOB_FAILED, EXIT_OK, SlurmCommandError
from hpcqwen.pipeline import control
from hpcqwen.pipeline.definition import load_pipeline
from hpcqwen.pipeline.record import read_record

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
STEPS = "{task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '2', --step-seconds, '0.2']}}"


def _pipeline_dir(out: str) -> Path:
    return Path(out.split("pipeline dir: ")[1].split()[0])


def _sacct_rows(job_ids: list[str]) -> list[list[str]]:
    out = subprocess.run(["sacct", "--duplicates", "-X", "-n", "-P", f"--jobs={','.join(job_ids)}",
                          "--format=JobID,Start,End,AllocTRES,State"], capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def _seconds(a: str, b: str) -> float:
    return (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()


@pytest.mark.cpu_train
def test_the_tiny_reasoning_pipeline_runs_end_to_end(slurm_cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pipeline", "submit", str(REPO / "pipelines/qwen3-tiny-reasoning.yaml"), "--wait"]) == EXIT_OK
    out = capsys.readouterr().out
    pdir = _pipeline_dir(out)
    record = read_record(pdir)
    assert list(record.stages) == ["prepare", "distill", "merge", "sft", "grpo", "export", "eval"]
    assert all(s.state == "COMPLETED" for s in control.pipeline_status(pdir))
    stage = {n: Path(s.run_dir) for n, s in record.stages.items()}
    used = json.loads((stage["sft"] / "inputs.json").read_text())
    assert used["${stages.distill.result_path}"] == str(stage["distill"] / "distill_dataset.jsonl")
    assert json.loads((stage["grpo"] / "inputs.json").read_text())["${stages.sft.export}"].startswith(
        str(stage["sft"] / "exports" / "checkpoint-"))
    assert (stage["export"] / "model" / "config.json").is_file()
    result = json.loads((stage["eval"] / "eval.json").read_text())
    assert result["rows"] == result["graded"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    # GPU-hours: the pipeline's total is every stage's sacct allocation (elapsed × GPUs, incarnations included).
    assert main(["cost", str(pdir)]) == EXIT_OK
    table = capsys.readouterr().out
    cost = json.loads((pdir / "cost.json").read_text())
    rows = _sacct_rows([j for s in record.stages.values() for j in s.job_ids])
    sacct_total = sum(_seconds(r[1], r[2]) * int(r[3].split("gres/gpu=")[1].split(",")[0]) for r in rows) / 3600
    assert cost["allocated_gpu_hours"] == pytest.approx(sacct_total, abs=1e-4)
    walls = {n: max(_seconds(r[1], r[2]) for r in _sacct_rows(s.job_ids)) for n, s in record.stages.items()}
    first = min(r[1] for r in rows)
    print(f"\ntiny pipeline: {_seconds(first, max(r[2] for r in rows)):.0f} s from the first start to the end; "
          "wall s per stage: " + ", ".join(f"{n} {w:.0f}" for n, w in walls.items()) + f"\n{table}")


def _fail_third_sbatch() -> slurm.RunCmd:
    calls = []

    def run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        if argv[0] == "sbatch" and "--test-only" not in argv:
            calls.append(argv)
            if len(calls) == 3:
                return subprocess.CompletedProcess(list(argv), 1, "", "sbatch: error: Batch job submission failed: "
                                                   "Socket timed out on send/recv operation (stubbed)\n")
        return slurm.run_cmd(argv, timeout)
    return run


def test_a_failed_sbatch_at_stage_3_leaves_nothing_queued(slurm_cluster: str, write_spec, run_root: Path) -> None:
    """The third sbatch answers with an error (stubbed at the command boundary): stages 1-2 are cancelled."""
    tag = f"half{uuid.uuid4().hex[:6]}"  # the cluster is shared: jobs are told apart by name
    path = write_spec(f"name: {tag}\nstages:\n  a: {{spec: {STEPS.replace('2', '60')}}}\n  b: {{spec: {STEPS}, "
                      f"after: [a]}}\n  c: {{spec: {STEPS}, after: [b]}}\n", "half.yaml")
    pipeline = load_pipeline(path)
    with pytest.raises(SlurmCommandError, match="stubbed"):
        control.submit_pipeline(pipeline, SlurmBackend(run=_fail_third_sbatch()), None)
    assert not (run_root / tag).exists() or not list((run_root / tag).iterdir())  # no pipeline dir left
    def states() -> list[str]:
        return [r.slurm_state for r in slurm.squeue(user=None) if r.name.startswith(f"{tag}-")]
    wait_until(lambda: states() == ["CANCELLED"] * 2, 60, "stages a and b to end CANCELLED (a saves first)")


def test_resume_redoes_only_what_did_not_finish_or_whose_input_changed(slurm_cluster: str, write_spec,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    flag = tmp_path / "b.json"  # stage b (json.tool on it) fails until the file exists
    path = write_spec(f"""\
name: res
stages:
  a: {{spec: {STEPS}}}
  b: {{spec: {{task: {{kind: command, module: json.tool, args: ["{flag}"]}}}}, after: [a]}}
  c: {{spec: {{task: {{kind: command, module: json.tool, args: ["${{stages.b.run_dir}}/spec.json"]}}}},
      after: ["afterany:b"]}}
  d: {{spec: {STEPS}, after: [b]}}
""", "res.yaml")
    assert main(["pipeline", "submit", str(path), "--wait"]) == EXIT_JOB_FAILED
    pdir = _pipeline_dir(capsys.readouterr().out)
    states = {s.name: (s.state, s.blocked_on) for s in control.pipeline_status(pdir)}
    assert states["a"] == ("COMPLETED", "") and states["b"][0] == "FAILED"
    assert states["d"][1] == "never runs: b ended FAILED"
    before = read_record(pdir)
    flag.write_text("{}")
    assert main(["pipeline", "resume", str(pdir), "--wait"]) == EXIT_OK
    after = read_record(pdir)
    assert after.stages["a"].job_ids == before.stages["a"].job_ids  # finished: never redone
    assert len(after.stages["b"].job_ids) == 2 and len(after.stages["d"].job_ids) == 2
    assert after.stages["c"].earlier_run_dirs == [before.stages["c"].run_dir]  # its input (b) was redone
    assert after.stages["c"].run_dir.endswith("/stages/c.1")
    wait_until(lambda: all(s.state == "COMPLETED" for s in control.pipeline_status(pdir)), 60, "every stage")
    assert main(["pipeline", "status", str(pdir)]) == EXIT_OK
    assert "pipeline res: COMPLETED" in capsys.readouterr().out
