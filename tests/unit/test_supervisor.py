"""The launcher as the ranks' supervisor, with real processes: a crash stops the node at once, a stop
signal reaches every rank and ends as `stopped`, no rank outlives a killed launcher, one live launch
per task (the lease), and the rendezvous port published by node 0 for the other nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen.lease import pid_alive
from hpcqwen.paths import RunPaths
from hpcqwen.spec import load_spec, read_source
from hpcqwen.submit import prepare_run_dir

RANK_MODULE = """
import os, sys, time
from pathlib import Path
from hpcqwen import stopping

task = Path(os.environ["HPCQWEN_TASK_DIR"])
rank = int(os.environ["RANK"])
if os.environ.get("RANK_MODE") == "slowstart":  # still importing torch, say: no handler yet
    (task / f"pid-{rank}").write_text(str(os.getpid()))
    time.sleep(60)
stopping.install_handlers(task / "STOP")
(task / f"pid-{rank}").write_text(str(os.getpid()))
if os.environ.get("RANK_MODE") == "crash" and rank == 1:
    time.sleep(0.5)
    sys.exit(3)
while True:
    if stopping.requested():
        (task / f"saved-{rank}").write_text(stopping.received() or "STOP file")
        sys.exit(stopping.EXIT_STOPPED)
    time.sleep(0.02)
"""


@pytest.fixture
def run_dir(tmp_path: Path, write_spec) -> RunPaths:
    (tmp_path / "rankmod.py").write_text(textwrap.dedent(RANK_MODULE))
    path = write_spec("name: sup\nresources: {nproc_per_node: 3}\ntask: {kind: command, module: rankmod}\n")
    return prepare_run_dir(load_spec(path), read_source(path), "test", {})


def _launch(paths: RunPaths, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ["PYTHONPATH"] = f"{tmp_path}:{environ.get('PYTHONPATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "hpcqwen", "launch", str(paths.root)], text=True,
                            env={**environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rank_pids(paths: RunPaths, n: int = 3) -> list[int]:
    wait_until(lambda: all((paths.root / f"pid-{r}").exists() for r in range(n)), 60, "every rank to start")
    return [int((paths.root / f"pid-{r}").read_text()) for r in range(n)]


def test_a_crashed_rank_stops_the_node_at_once(run_dir: RunPaths, tmp_path: Path) -> None:
    t0 = time.time()
    proc = _launch(run_dir, tmp_path, RANK_MODE="crash")
    pids = _rank_pids(run_dir)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert time.time() - t0 < 30 and not any(pid_alive(p) for p in pids)
    assert "a rank failed (exit code 3)" in err
    assert run_dir.task(None).outcome.read_text().startswith("failed ")


def test_term_to_the_launcher_reaches_every_rank_which_stop_as_resumable(run_dir: RunPaths, tmp_path: Path) -> None:
    proc = _launch(run_dir, tmp_path)
    _rank_pids(run_dir)
    proc.send_signal(signal.SIGTERM)  # only the launcher: as `kill PID` would
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # done or stopped: the OUTCOME file tells them apart
    assert all((run_dir.root / f"saved-{r}").read_text() == "SIGTERM" for r in range(3))
    outcome = run_dir.task(None).outcome.read_text()
    assert outcome.startswith("stopped ") and "codes=75,75,75" in outcome and "signal=SIGTERM" in outcome
    assert run_dir.task(None).stop.exists()  # the other nodes learn it from the file
    launches = [json.loads(x) for x in run_dir.task(None).launches.read_text().splitlines()]
    assert len(launches) == 1 and launches[0]["restart_count"] == 0
    assert "ranks ended stopped" in out


def test_a_stop_during_start_up_is_a_stop_not_a_crash(run_dir: RunPaths, tmp_path: Path) -> None:
    """Preemption while the ranks still import: they die of the SIGTERM itself, nothing newer than the
    last checkpoint is lost, and the outcome is `stopped` (so the job is requeued, not failed)."""
    proc = _launch(run_dir, tmp_path, RANK_MODE="slowstart")
    pids = _rank_pids(run_dir)
    for pid in pids:  # Slurm signals every process of the step
        os.kill(pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert run_dir.task(None).outcome.read_text().startswith("stopped ")


def test_a_stop_while_the_launcher_itself_starts_starts_no_rank_and_is_stopped(run_dir: RunPaths,
                                                                               tmp_path: Path) -> None:
    """The TERM comes while the launcher imports and reads the spec (held there by a test fault): it is kept,
    no rank is started (nothing new to save), the outcome is `stopped` and the launcher exits 0."""
    proc = _launch(run_dir, tmp_path, HPCQWEN_TEST_FAULT="launch_delay:node=0:seconds=60")
    assert proc.stderr is not None
    first = proc.stderr.readline()  # printed by the fault, after the imports and the spec
    assert "launcher waits 60 s" in first, first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGTERM came before the ranks started: not starting them" in err
    assert "ranks ended stopped before they started (SIGTERM)" in out
    assert not list(run_dir.root.glob("pid-*"))
    outcome = run_dir.task(None).outcome.read_text()
    assert outcome.startswith("stopped ") and "codes= " in outcome and "signal=SIGTERM" in outcome


def test_no_rank_outlives_a_killed_launcher(run_dir: RunPaths, tmp_path: Path) -> None:
    proc = _launch(run_dir, tmp_path)
    pids = _rank_pids(run_dir)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 20, "the ranks to die with their launcher")


def test_a_second_live_launch_is_refused_and_a_dead_holder_releases(run_dir: RunPaths, tmp_path: Path) -> None:
    first = _launch(run_dir, tmp_path, HPCQWEN_JOB_ID="job-a")
    _rank_pids(run_dir)
    second = _launch(run_dir, tmp_path, HPCQWEN_JOB_ID="job-b")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 1, err
    assert "error[lease]: task dir" in err and "is in use by job job-a" in err and "Traceback" not in err
    first.kill()
    first.wait()
    for r in range(3):
        (run_dir.root / f"pid-{r}").unlink()
    third = _launch(run_dir, tmp_path, HPCQWEN_JOB_ID="job-c")  # job-a's pid is gone: its lease is free
    _rank_pids(run_dir)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 0


@pytest.mark.cpu_dist
def test_two_launchers_meet_on_the_port_node_0_publishes(write_spec, tmp_path: Path) -> None:
    """Two 'nodes' on this machine: launchers with SLURM_NODEID 0 and 1, the port from the run dir, gloo."""
    path = write_spec("name: two\nresources: {nodes: 2, nproc_per_node: 2}\n"
                      "task: {kind: command, module: hpcqwen.examples.allreduce}\n")
    paths = prepare_run_dir(load_spec(path), read_source(path), "test", {})
    base = {**os.environ, "SLURM_JOB_ID": str(31337 + os.getpid()), "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "localhost"}
    base.pop("HPCQWEN_MASTER_PORT", None)
    # stderr apart: a warning written to stderr in pieces would otherwise cut into a rank's line
    procs = [subprocess.Popen([sys.executable, "-m", "hpcqwen", "launch", str(paths.root)],
                              env={**base, "SLURM_NODEID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]  # node 1 starts first and waits
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    lines = [line for out, _ in results for line in out.splitlines() if line.startswith("allreduce ")]
    assert len(lines) == 4 and all("sum=10 expected=10" in line for line in lines)  # 1+2+3+4
    assert {line.split("node_rank=")[1][0] for line in lines} == {"0", "1"}
    published = json.loads((paths.root / ".rendezvous.json").read_text())
    assert all(f"localhost:{published['port']}" in line for line in lines)
    assert paths.task(None).outcome.read_text().startswith("done ")
