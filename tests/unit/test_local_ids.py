"""The `local-NNNN` ids that `hpcqwen submit --backend local` prints work in every command that takes a
job (issue 13 items 12 and 17): `status`, `logs` (also `-f`), `cancel`, and `queue` shows them; and
`cancel local-NNNN` of a finished run whose pid now belongs to another program signals nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK

REPO = Path(__file__).resolve().parents[2]


def test_cancel_of_a_local_id_whose_pid_was_reused_signals_nothing(tmp_path: Path, run_root: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from hpcqwen.spec import load_spec, read_source
    from hpcqwen.submit import prepare_run_dir

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("name: old\ntask: {kind: command, module: m}\n")
    paths = prepare_run_dir(load_spec(spec_path), read_source(spec_path), "local", {})
    other = subprocess.Popen(["sleep", "60"])  # the program that got the finished run's pid
    try:
        manifest = json.loads(paths.manifest.read_text())
        paths.manifest.write_text(json.dumps({**manifest, "job_ids": [f"local-{other.pid}"]}))
        assert main(["cancel", f"local-{other.pid}"]) == EXIT_OK
        assert capsys.readouterr().out == f"local-{other.pid} is not running\n"
        assert other.poll() is None  # not signalled
        assert main(["status", f"local-{other.pid}", "--json"]) == EXIT_OK
        st = json.loads(capsys.readouterr().out)
        assert st["run_dir"] == str(paths.root) and st["tasks"][0]["state"] == "FAILED"  # no exit code, not running
    finally:
        other.kill()
        other.wait()


def test_local_ids_in_status_logs_and_queue_with_fake_squeue_on_path(write_spec, run_root: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec("name: loc\ntask: {kind: command, module: hpcqwen.examples.steps, "
                      "args: [--steps, '2', --step-seconds, '0.05']}\n")
    assert main(["submit", str(spec), "--backend", "local", "--wait"]) == EXIT_OK
    out = capsys.readouterr().out
    job = out.split("submitted job ")[1].split()[0]
    assert job.startswith("local-")
    assert main(["status", job, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["tasks"][0]["state"] == "COMPLETED"
    for argv in (["logs", job], ["logs", "-f", job]):
        assert main(argv) == EXIT_OK
        assert "steps: finished 2 steps" in capsys.readouterr().out
    # queue asks squeue (this user's jobs) even when every run is local: a fake squeue on PATH that
    # knows no job stands in for the cluster (a stub at the process boundary)
    fake = tmp_path / "bin" / "squeue"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "HPCQWEN_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "queue", "--json", "--me"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    [row] = json.loads(proc.stdout)["runs"]
    assert (row["job_id"], row["state"], row["source"]) == (job, "SUCCEEDED", "local")


def test_a_cancelled_local_run_reads_cancelled_as_soon_as_its_exit_code_is_written(tmp_path: Path,
                                                                                   run_root: Path) -> None:
    """localrun writes logs/local.rc, then lives a moment longer: that moment must not read STOPPED."""
    from hpcqwen.paths import RunPaths
    from hpcqwen.rundir import local_status
    from hpcqwen.spec import load_spec, read_source
    from hpcqwen.submit import prepare_run_dir

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("name: ending\ntask: {kind: command, module: m}\n")
    paths: RunPaths = prepare_run_dir(load_spec(spec_path), read_source(spec_path), "local", {})
    # a process whose command line is localrun's for this run dir, still alive
    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hpcqwen.localrun",
                               str(paths.root)])
    try:
        job = f"local-{ending.pid}"
        from helpers import wait_until

        wait_until(lambda: local_status(paths, job) == "RUNNING", 10, "the process to exec")
        paths.local_cancelled.touch()
        assert local_status(paths, job) == "RUNNING"  # saving before it stops
        paths.local_rc.write_text("75\n")
        assert local_status(paths, job) == "CANCELLED"
        paths.local_rc.write_text("0\n")  # it finished as it was cancelled
        assert local_status(paths, job) == "COMPLETED"
    finally:
        ending.kill()
        ending.wait()
    paths.local_rc.unlink()
    assert local_status(paths, job) == "CANCELLED"  # gone without an exit code, after a cancel
