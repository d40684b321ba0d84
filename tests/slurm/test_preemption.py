"""The signal chain on the real local Slurm cluster: partition preemption (SIGTERM to every process of
the step, GraceTime, the batch script requeues itself), `scancel --signal=TERM`, `scancel`, the last
allowed restart (STOPPED, not COMPLETED), array tasks (only the signalled task is requeued), the
submitit backend, and `hpcqwen resume`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen import runs, slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE
from hpcqwen.metrics import read_metrics

pytestmark = pytest.mark.slurm
DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"


def submit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, Path]:
    rc = main(["submit", *argv])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err + out
    line = next(x for x in out.splitlines() if x.startswith("submitted job "))
    job, run_dir = line.removeprefix("submitted job ").split("  run dir: ")
    return job, Path(run_dir)


def steps_spec(write_spec, name: str, steps: int, step_s: float, extra: str = "", partition: str = "debug") -> Path:
    return write_spec(f"""
        name: {name}
        resources: {{time_limit_min: 10, partition: {partition}}}
        task: {{kind: command, module: hpcqwen.examples.steps, args: [--steps, '{steps}', --step-seconds, '{step_s}']}}
        {extra}
    """, f"{name}.yaml")


def step_of(task_dir: Path) -> int:
    path = task_dir / "progress.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


def state(job: str) -> str:
    rows = slurm.query_jobs([job])[job]
    return rows[0].slurm_state if rows else ""


def preempt(job: str, command: str) -> subprocess.CompletedProcess[str]:
    """A job in partition `high` that needs exactly the nodes `job` holds (so it must preempt it)."""
    nodes = subprocess.run(["squeue", "--noheader", "-o", "%N", f"--jobs={job}"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    count = len(subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split())
    return subprocess.run(["sbatch", "--parsable", "-p", "high", f"-N{count}", f"--nodelist={nodes}", "--exclusive",
                           "-J", "preemptor", "-o", "/dev/null", "--wrap", command], capture_output=True, text=True,
                          check=True)


def log_of(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def test_partition_preemption_saves_within_grace_requeues_and_finishes(
        slurm_cluster: str, write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 2-node SFT in `low` is preempted by a job in `high` that needs both nodes."""
    spec = write_spec(f"""
        name: sft-low
        resources: {{nodes: 2, nproc_per_node: 1, time_limit_min: 20, partition: low}}
        task:
          kind: sft
          model: {tiny_qwen3_dir}
          dataset: [{DATA}]
          torch_dtype: float32
          max_steps: 40
          save_steps: 100
          logging_steps: 1
          per_device_train_batch_size: 4
          gradient_accumulation_steps: 2
          learning_rate: 5e-3
          max_length: 256
          gradient_checkpointing: false
    """)
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: any(m.get("step", 0) >= 5 and "loss" in m for m in read_metrics(run_dir / "metrics.jsonl")),
               300, "5 training steps")
    high = preempt(job, "sleep 5")
    preempted_at = time.time()
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-3000:]
    assert "got SIGTERM: saving at the end of this step" in log
    assert "hpcqwen: stopped; requeued" in log
    stopped = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "stopped"]
    assert len(stopped) == 1
    saved = run_dir / "checkpoints" / f"checkpoint-{stopped[0]['step']}" / "hpcqwen-complete.json"
    assert saved.is_file() and saved.stat().st_mtime - preempted_at < 60  # inside GraceTime (60 s)
    train = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "train" and "loss" in m]
    assert train == list(range(1, 41))  # every step once: nothing lost, nothing logged twice
    resumed = [x for x in log.splitlines() if x.startswith("sft: resuming from ")]
    assert len(resumed) == 1 and resumed[0].endswith(f"checkpoint-{stopped[0]['step']}")
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["restart_count"] for x in launches] == [0, 1]
    assert state(high.stdout.strip()) in ("COMPLETED", "")


def test_term_on_the_last_allowed_restart_is_stopped_not_completed(
        slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "last", 600, 0.5, "requeue: {max_restarts: 0}")
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: step_of(run_dir) >= 2, 90, "2 steps")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # every process of the step, not the job
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["STOPPED"], log_of(run_dir)[-2000:]
    assert (run_dir / "FINAL").read_text() == "STOPPED restart limit reached (0 of 0)\n"
    assert "steps: stop requested (SIGTERM), stopped at step" in log_of(run_dir)
    assert main(["status", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "STOPPED" in out and f"hpcqwen resume {run_dir}" in out
    saved = step_of(run_dir)
    # resume: the same run dir, a new job, continues from the saved step
    assert main(["resume", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    new_job = out.split("submitted job ")[1].split()[0]
    assert new_job != job
    wait_until(lambda: state(new_job) == "RUNNING", 60, "the resumed job to run")
    assert main(["resume", str(run_dir)]) == EXIT_USAGE  # still running: refused
    assert "is still RUNNING" in capsys.readouterr().err
    wait_until(lambda: step_of(run_dir) > saved, 60, "the resumed job to make progress")
    assert f"steps: start at step {saved} " in log_of(run_dir)
    subprocess.run(["scancel", new_job], check=True)


def test_wait_reports_stopped_with_exit_3(slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "waitstop", 600, 0.5, "requeue: {enabled: false}")
    import threading

    def stop_later() -> None:
        rows: list[slurm.JobRow] = []
        for _ in range(120):
            rows = [r for r in slurm.squeue(user=None) if r.name == "waitstop" and r.slurm_state == "RUNNING"]
            if rows:
                break
            time.sleep(0.5)
        time.sleep(3)
        subprocess.run(["scancel", "--signal=TERM", rows[0].job_id], check=False)
    thread = threading.Thread(target=stop_later)
    thread.start()
    rc = main(["submit", str(spec), "--wait"])
    thread.join()
    err = capsys.readouterr().err
    assert rc == EXIT_JOB_FAILED
    assert "ended STOPPED: it saved a complete checkpoint but did not finish (STOPPED requeue is off)" in err
    assert "hpcqwen resume" in err


def test_scancel_saves_and_reads_cancelled(slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "cancelme", 600, 0.5)
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: step_of(run_dir) >= 2, 90, "2 steps")
    assert main(["cancel", job]) == EXIT_OK
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["CANCELLED"]
    assert "steps: stop requested (SIGTERM), stopped at step" in log_of(run_dir)  # it saved first


def test_only_the_signalled_array_task_is_requeued(slurm_cluster: str, write_spec,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "arrpre", 30, 0.5, "array: {size: 3}")
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: all(step_of(run_dir / "tasks" / str(i)) >= 2 for i in range(3)), 120, "every task to run")
    subprocess.run(["scancel", "--signal=TERM", f"{job}_1"], check=True)
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["COMPLETED"] * 3
    restarts = {i: [json.loads(x)["restart_count"] for x in (run_dir / "tasks" / str(i) / "launches.jsonl")
                    .read_text().splitlines()] for i in range(3)}
    assert restarts == {0: [0], 1: [0, 1], 2: [0]}
    assert all(step_of(run_dir / "tasks" / str(i)) == 30 for i in range(3))
    log1 = next((run_dir / "logs").glob(f"*_{job}_1.out"), None) or next((run_dir / "logs").glob("*_1.out"))
    assert f"requeued {job}_1 (restart 1 of 3)" in log1.read_text()


def test_submitit_backend_preempted_requeues_and_resumes(slurm_cluster: str, write_spec,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "subpre", 40, 0.5, partition="low")
    job, run_dir = submit(capsys, str(spec), "--backend", "submitit")
    wait_until(lambda: step_of(run_dir) >= 3, 120, "3 steps")
    preempt(job, "sleep 3")
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*_log.out"))
    assert [r.slurm_state for r in rows] == ["COMPLETED"], logs[-3000:]
    assert "steps: stop requested (SIGTERM)" in logs and "hpcqwen: stopped; requeued" in logs
    assert "restart_count=1" in logs and step_of(run_dir) == 40


def test_submitit_backend_time_limit_usr2_saves_requeues_and_finishes(slurm_cluster: str, write_spec,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """submitit sends USR2 to every process of the step (no `B:`): the ranks save and stop, hpcqwen's job
    function requeues (not submitit's handler, which would refuse a command as "not checkpointable")."""
    spec = write_spec("""
        name: subtl
        resources: {time_limit_min: 2}
        requeue: {signal_lead_s: 60, max_restarts: 3}
        task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '130', --step-seconds, '0.5']}
    """)
    job, run_dir = submit(capsys, str(spec), "--backend", "submitit")
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*_log.out"))
    assert [r.slurm_state for r in rows] == ["COMPLETED"], logs[-3000:]
    assert "steps: stop requested (SIGUSR2)" in logs and f"hpcqwen: stopped; requeued {job}" in logs
    assert "Job not requeued" not in logs and "steps: finished 130 steps" in logs
