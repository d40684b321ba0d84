"""The rest of the signal chain on the real local Slurm cluster: `scancel --signal=TERM`, `scancel`, the last
allowed restart (STOPPED, not COMPLETED), array tasks (only the signalled task is requeued), the submitit
backend's time-limit USR2, and `hpcqwen resume` (partition preemption: test_preemption.py)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from helpers import wait_until
from signal_helpers import log_of, state, step_of, steps_spec, submit

from hpcqwen import runs, slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE

pytestmark = pytest.mark.slurm


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

    def stop_later() -> None:  # after 2 steps (a TERM while the launcher starts: the test below)
        rows: list[slurm.JobRow] = []
        for _ in range(120):
            rows = [r for r in slurm.squeue(user=None) if r.name == "waitstop" and r.slurm_state == "RUNNING"]
            if rows:
                break
            time.sleep(0.5)
        run_dir = runs.resolve_target(rows[0].job_id).run_dir
        assert run_dir is not None
        wait_until(lambda: step_of(run_dir) >= 2, 90, "2 steps")
        subprocess.run(["scancel", "--signal=TERM", rows[0].job_id], check=False)
    thread = threading.Thread(target=stop_later)
    thread.start()
    rc = main(["submit", str(spec), "--wait"])
    thread.join()
    err = capsys.readouterr().err
    assert rc == EXIT_JOB_FAILED
    assert ("ended STOPPED: stopped on request before it finished; it continues from its last complete "
            "checkpoint (STOPPED requeue is off)") in err
    assert "hpcqwen resume" in err


def test_term_while_the_launcher_starts_is_a_stop_not_a_failure(
        slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Preemption or scancel can come while the launcher still imports and reads the spec (seconds on a
    loaded node): no rank has started, nothing is lost; the attempt is STOPPED, and requeued when requeue is on."""
    monkeypatch.setenv("HPCQWEN_TEST_FAULT", "launch_delay:node=0:seconds=120")  # a launcher that starts slowly
    spec = steps_spec(write_spec, "earlyterm", 600, 0.5, "requeue: {enabled: false}")
    job, run_dir = submit(capsys, str(spec))
    wait_until(lambda: "launcher waits 120 s" in log_of(run_dir), 90, "the launcher to start")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=2)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["STOPPED"], log[-3000:]
    assert "SIGTERM came before the ranks started: not starting them" in log
    assert "ranks ended stopped before they started (SIGTERM)" in log
    assert (run_dir / "FINAL").read_text() == "STOPPED requeue is off\n"
    assert step_of(run_dir) == 0


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
