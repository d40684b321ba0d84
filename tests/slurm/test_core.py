"""The core path on the real local Slurm cluster (cluster/local/up): 2 nodes, arrays, dependencies,
cancel, status through squeue and sacct, requeue (scontrol and USR2), submitit, bad partitions,
a dead controller."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import scontrol_requeue, wait_until
from signal_helpers import state, steps_spec, submit

from hpcqwen import runs, slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_SLURM, EXIT_USAGE

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def test_two_node_allreduce_through_the_launcher(slurm_cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["submit", str(REPO / "jobspecs/allreduce-2node.yaml"), "--wait"])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    assert err.startswith("backend: slurm (")
    run_dir = Path(out.splitlines()[0].split("  run dir: ")[1])
    log = next((run_dir / "logs").glob("allreduce-2node-*.out")).read_text()
    sums = [line for line in log.splitlines() if line.startswith("allreduce ")]
    assert len(sums) == 2 and all("sum=3 expected=3" in line for line in sums)
    assert {"node_rank=0 host=n1", "node_rank=1 host=n2"} == {line.split(" ", 3)[2] + " " + line.split(" ")[3]
                                                             for line in sums}
    summaries = [line for line in log.splitlines() if " launch: spec sha256 " in line]
    assert len(summaries) == 2 and any("node 0/2 (n1) master n1:" in s for s in summaries)
    assert any("node 1/2 (n2) master n1:" in s for s in summaries)


def test_array_throttle_is_respected(slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    spec = steps_spec(write_spec, "arr", 3, 1.0, "array: {size: 6, throttle: 2}")
    job, run_dir = submit(capsys, str(spec))
    most, seen_done = 0, 0
    end = time.time() + 120
    while time.time() < end:
        rows = slurm.query_jobs([job])[job]
        running = sum(r.slurm_state == "RUNNING" for r in rows)
        most = max(most, running)
        seen_done = sum(r.slurm_state == "COMPLETED" for r in rows)
        if seen_done == 6:
            break
        time.sleep(0.3)
    assert seen_done == 6 and most == 2, (seen_done, most)
    for i in range(6):
        assert json.loads((run_dir / "tasks" / str(i) / "progress.json").read_text()) == {"step": 3}


def test_depends_on_afterok_and_cancel(slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    first, first_dir = submit(capsys, str(steps_spec(write_spec, "first", 4, 1.0)))
    second, _ = submit(capsys, str(steps_spec(write_spec, "second", 1, 0.1, f"depends_on: ['{first_dir}']")))
    wait_until(lambda: state(first) == "RUNNING", 60, "the first job to run")
    row = slurm.query_jobs([second])[second][0]
    assert (row.slurm_state, row.reason) == ("PENDING", "Dependency")
    wait_until(lambda: state(second) == "COMPLETED", 120, "the dependent job to complete")
    assert state(first) == "COMPLETED"
    # and cancel: a long job, cancelled through the CLI by its job id
    long_job, long_dir = submit(capsys, str(steps_spec(write_spec, "long", 600, 1.0)))
    wait_until(lambda: state(long_job) == "RUNNING", 60, "the long job to run")
    assert main(["cancel", long_job]) == 0
    assert capsys.readouterr().out == f"cancelled {long_job}\n"
    wait_until(lambda: state(long_job) == "CANCELLED", 60, "CANCELLED")
    assert main(["status", str(long_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["tasks"][0]["state"] == "CANCELLED" and status["tasks"][0]["source"] == "squeue"


def test_status_after_the_job_left_the_queue_comes_from_sacct(slurm_cluster: str, write_spec,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    job, run_dir = submit(capsys, str(steps_spec(write_spec, "quick", 1, 0.1)), "--wait")
    squeue_only = ["squeue", "--noheader", "--states=all", f"--jobs={job}"]
    # MinJobAge=30 on the local cluster; slurmctld purges on its own (about minute-long) cycle.
    wait_until(lambda: subprocess.run(squeue_only, capture_output=True, text=True).returncode != 0, 180,
               "the controller to forget the job", every=3)
    assert main(["status", job, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run_dir"] == str(run_dir)  # job id -> run dir through sacct's WorkDir
    assert [(t["state"], t["source"]) for t in status["tasks"]] == [("COMPLETED", "sacct")]


def test_scontrol_requeue_restarts_and_resumes(slurm_cluster: str, write_spec,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    job, run_dir = submit(capsys, str(steps_spec(write_spec, "requeued", 25, 1.0)))
    progress = run_dir / "progress.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text())["step"] >= 3, 90, "3 steps")
    scontrol_requeue(job)
    ref = runs.resolve_target(str(run_dir))
    rows = runs.wait_for(ref, max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["COMPLETED"]
    log = next((run_dir / "logs").glob("requeued-*.out")).read_text()
    assert "steps: start at step 0 restart_count=0" in log
    restarted = [line for line in log.splitlines() if "restart_count=1" in line]
    assert restarted and int(restarted[0].split("start at step ")[1].split()[0]) >= 3, log
    assert f"job {job} restart 1 node 0/1" in log  # SLURM_RESTART_COUNT reached the launcher
    assert json.loads(progress.read_text())["step"] == 25
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["restart_count"] for x in launches] == [0, 1]
    # Slurm requeued it itself (the job was COMPLETING): the batch script must not requeue it a second time
    assert f"requeued {job} (restart" not in log


def test_usr2_before_the_time_limit_stops_and_requeues(slurm_cluster: str, write_spec,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # 130 steps of 0.5 s need 65 s; USR2 comes 60 s before the 2-minute limit (Slurm may send it up to
    # 60 s earlier still), so the first run is always stopped by the signal.
    spec = write_spec("""
        name: preempted
        resources: {time_limit_min: 2}
        requeue: {signal_lead_s: 60, max_restarts: 3}
        task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '130', --step-seconds, '0.5']}
    """)
    job, run_dir = submit(capsys, str(spec))
    ref = runs.resolve_target(str(run_dir))
    rows = runs.wait_for(ref, max_poll_s=3)
    log = next((run_dir / "logs").glob("preempted-*.out")).read_text()
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log
    assert "hpcqwen: USR2: time limit in 60 s: saving" in log
    assert "steps: stop requested (STOP file), stopped at step" in log
    assert f"hpcqwen: stopped; requeued {job} (restart 1 of 3)" in log
    assert "restart_count=1" in log and "steps: finished 130 steps" in log
    assert not (run_dir / "STOP").exists()  # removed by the restarted batch script


def test_submitit_backend_runs_the_hello_allreduce(slurm_cluster: str, run_root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["submit", str(REPO / "jobspecs/hello-allreduce.yaml"), "--backend", "submitit", "--wait"])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    run_dir = Path(out.splitlines()[0].split("  run dir: ")[1])
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*_log.out"))
    assert logs.count("sum=3 expected=3") == 2 and " launch: spec sha256 " in logs
    assert json.loads((run_dir / "manifest.json").read_text())["backend"] == "submitit"


def test_rejected_sbatch_leaves_nothing(slurm_cluster: str, run_root: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # The preflight asks the cluster first (issue 16): the partition is refused before any sbatch.
    rc = main(["submit", str(REPO / "jobspecs/hello-allreduce.yaml"), "--set", "resources.partition=nosuchpart"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert "resources.partition: partition 'nosuchpart' does not exist on this cluster" in err
    assert "expected one of debug, high, low" in err and "Traceback" not in err
    assert list(run_root.iterdir()) == []


def test_dead_controller(slurm_cluster: str, run_root: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).resolve().read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(conf.replace("SlurmctldPort=6817", "SlurmctldPort=6899"))  # nothing listens there
    monkeypatch.setenv("SLURM_CONF", str(dead))
    rc = main(["submit", str(REPO / "jobspecs/hello-allreduce.yaml"), "--backend", "slurm"])
    err = capsys.readouterr().err
    assert rc == EXIT_SLURM and err.startswith("error[controller]: no Slurm controller answers") and \
        "cluster/local/up" in err
    assert list(run_root.iterdir()) == []
    rc = main(["status", "12345"])
    err = capsys.readouterr().err
    assert rc == EXIT_SLURM and "the Slurm controller does not answer" in err
