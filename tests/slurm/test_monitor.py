"""`hpcqwen queue` on the real local Slurm cluster: states, training progress, arrays, the polling
budget measured with sdiag's RPC counters, a dead controller mid-watch, and `logs -f` across a
requeue."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from monitor_helpers import SUFFIX, MonitorJobs, Tmux, cli, fake_train, slurm_state, submit, wait_until

from hpcqwen import slurm

pytestmark = pytest.mark.slurm
RPC_USER = "games"  # an account no other test uses: sdiag's per-user counter then sees only our squeue calls


def progress_of(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def table_lines(text: str, jobs: MonitorJobs) -> dict[str, str]:
    """The frame's line of each of our runs, by short name (sft, dep, arr)."""
    out = {}
    for key, name in jobs.names.items():
        hits = [ln for ln in text.splitlines() if name in ln]
        assert len(hits) == 1, f"{name} should be on exactly one line:\n{text}"
        out[key] = hits[0]
    return out


@pytest.fixture
def running(monitor_jobs: MonitorJobs) -> MonitorJobs:
    """The session's jobs, once the SFT has logged a few steps and saved a checkpoint, and two
    array tasks run."""
    wait_until(lambda: progress_of(monitor_jobs.sft_dir) >= 6, 180, "the fake SFT to log 6 steps")
    wait_until(lambda: sum(progress_of(monitor_jobs.arr_dir / "tasks" / str(i)) > 0 for i in range(4)) >= 2, 180,
               "two array tasks to log a step")
    return monitor_jobs


def test_queue_once_shows_states_progress_and_a_collapsed_array(running: MonitorJobs, tmp_path: Path) -> None:
    env = {"HPCQWEN_CACHE_DIR": str(tmp_path / "cache")}
    proc = cli("queue", "--once", "--name", running.pattern, "--run-root", str(running.root), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    line = table_lines(proc.stdout, running)
    assert re.search(rf"{running.sft}\s+RUNNING", line["sft"])
    step = int(re.search(r"(\d+)/200", line["sft"]).group(1))  # type: ignore[union-attr]
    assert step >= 6
    assert re.search(r"\d\.\d+ [▁▂▃▄▅▆▇█]{3,}", line["sft"]), "loss and its sparkline"
    assert re.search(r"\b[1-9]\d* \d+s\b", line["sft"]), "last complete checkpoint and its age"
    assert re.search(rf"{running.dep}\s+PENDING.*waiting for job {running.sft} to succeed", line["dep"])
    assert re.search(rf"▸ {running.names['arr']}\s+{running.arr}\s+RUNNING", line["arr"])
    assert "●●○○ 2● 2○" in line["arr"] and "└ task" not in proc.stdout
    assert "REWARD" in proc.stdout  # the GRPO-style array logs reward_mean

    data = json.loads(cli("queue", "--json", "--name", running.pattern, "--run-root", str(running.root),
                          env=env).stdout)
    runs = {r["name"]: r for r in data["runs"]}
    sft, arr = runs[running.names["sft"]], runs[running.names["arr"]]
    assert sft["state"] == "RUNNING" and sft["progress"]["total_steps"] == 200 and sft["progress"]["step"] >= 6
    assert sft["checkpoint_step"] >= 5 and sft["eta_s"] > 0 and sft["remaining_s"] > 0
    assert sft["run_dir"] == str(running.sft_dir) and sft["time_limit_s"] == 900
    assert runs[running.names["dep"]]["reason"] == "Dependency"
    assert [t["slurm_state"] for t in arr["tasks"]] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert arr["tasks"][2]["reason"] == "JobArrayTaskLimit" and arr["progress"]["reward_mean"] is not None
    assert data["squeue"]["error"] == "" and data["squeue"]["calls"] == 0  # the --once before filled the cache


def sdiag_counts() -> tuple[dict[str, int], dict[str, int]]:
    """(RPC count by message type, RPC count by user) from `sdiag`."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    by_type, by_user, section = {}, {}, None
    for line in out.splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = by_type
        elif line.startswith("Remote Procedure Call statistics by user"):
            section = by_user
        elif line.startswith("Pending RPC"):
            section = None
        elif section is not None and (m := re.match(r"\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)", line)):
            section[m.group(1)] = int(m.group(2))
    return by_type, by_user


def test_refreshes_cost_one_job_info_rpc_each_whatever_the_number_of_jobs(running: MonitorJobs,
                                                                          tmp_path: Path) -> None:
    # squeue runs as RPC_USER through a shim on PATH, so sdiag's per-user counter isolates the
    # monitor's calls from everything else on the shared controller.
    shim = tmp_path / "bin" / "squeue"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec runuser -u {RPC_USER} -- {shutil.which('squeue')} \"$@\"\n")
    shim.chmod(0o755)
    path = f"{shim.parent}:{os.environ['PATH']}"

    def user_rpcs() -> int:
        return sdiag_counts()[1].get(RPC_USER, 0)

    before = user_rpcs()
    subprocess.run([str(shim), "--noheader", "--array", "--states=all"], capture_output=True, check=True)
    per_squeue = user_rpcs() - before  # what one bare squeue costs (22.05: JOB_INFO + PARTITION_INFO)
    assert 1 <= per_squeue <= 2

    n = 4
    types_before, _ = sdiag_counts()
    before = user_rpcs()
    for i in range(n):  # N refreshes, each one due (its own cache): N squeue calls
        proc = cli("queue", "--once", "--run-root", str(running.root), "--name", running.pattern,
                   env={"PATH": path, "HPCQWEN_CACHE_DIR": str(tmp_path / f"cache{i}")})
        assert proc.returncode == 0 and running.names["arr"] in proc.stdout, proc.stderr
    spent = user_rpcs() - before
    types_after, _ = sdiag_counts()
    queue = slurm.squeue()
    jobs, ours = len(queue), sum(1 for r in queue if r.work_dir.startswith(str(running.root)))
    job_info = types_after.get("REQUEST_JOB_INFO", 0) - types_before.get("REQUEST_JOB_INFO", 0)
    print(f"\nsdiag: {n} refreshes over {jobs} job rows in the queue ({ours} ours) cost "
          f"{spent} RPCs from {RPC_USER} ({per_squeue} per squeue call); REQUEST_JOB_INFO grew by {job_info} "
          f"cluster-wide (other users included); N x M would be {n * jobs}")
    assert spent == n * per_squeue
    assert job_info >= n

    before = user_rpcs()
    shared = {"PATH": path, "HPCQWEN_CACHE_DIR": str(tmp_path / "shared")}
    for _ in range(3):  # three terminals within one interval share one answer
        assert cli("queue", "--once", "--run-root", str(running.root), env=shared).returncode == 0
    assert user_rpcs() - before == per_squeue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_controller_mid_watch_shows_a_banner_and_stale_data_then_recovers(
        running: MonitorJobs, tmux: Tmux, tmp_path: Path) -> None:
    real = Path("/etc/slurm/slurm.conf").resolve()
    conf = tmp_path / "etc" / "slurm.conf"
    conf.parent.mkdir()
    shutil.copy(real, conf)
    dead = re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={free_port()}", real.read_text())
    assert dead != real.read_text()
    env = {"SLURM_CONF": str(conf), "HPCQWEN_CACHE_DIR": str(tmp_path / "cache")}
    tmux.start(["queue", "--interval", "5", "--name", running.pattern, "--run-root", str(running.root)], env)
    tmux.wait_for(lambda s: running.names["sft"] in s and "RUNNING" in s, 30, "the first frame")

    conf.write_text(dead)  # the controller "dies": nothing listens on the new port
    down = tmux.wait_for(lambda s: "Slurm controller not answering" in s, 60, "the banner")
    assert "showing data from" in down and "Unable to contact slurm controller" in down
    assert running.names["sft"] in down and "RUNNING" in down and running.names["arr"] in down  # stale data
    aged = tmux.wait_for(lambda s: re.search(r"showing data from [1-9]\d*s ago", s) is not None, 30, "its age")
    assert "Traceback" not in aged + tmux.stderr()

    proc = cli("queue", "--once", "--run-root", str(running.root), env=env)  # same cache: stale rows too
    assert proc.returncode == 2 and "Slurm controller not answering" in proc.stdout
    assert running.names["sft"] in proc.stdout and "Traceback" not in proc.stdout + proc.stderr

    conf.write_text(real.read_text())  # back: the backoff (10 s, 20 s ...) ends at the next try
    tmux.wait_for(lambda s: "not answering" not in s and re.search(r"squeue \d+s ago", s) is not None, 90,
                  "recovery")
    tmux.send("q")
    tmux.wait_for(lambda s: "EXIT=0" in s, 15, "a clean exit")
    assert "Traceback" not in tmux.screen() + tmux.stderr()


def test_logs_follow_survives_a_requeue_and_the_monitor_counts_it(slurm_cluster: str, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    job, run_dir = submit(root, f"mon{SUFFIX}-rq", "resources: {time_limit_min: 10}\n"
                          + fake_train(16, 1.0, "--save-every", "4"))
    out = (tmp_path / "follow.txt").open("w")
    follower = subprocess.Popen([sys.executable, "-m", "hpcqwen", "logs", str(run_dir), "-f"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: progress_of(run_dir) >= 5, 120, "5 steps before the requeue")
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_until(lambda: slurm_state(job) == "COMPLETED", 240, "the requeued job to finish")
        follower.wait(timeout=60)
    finally:
        follower.kill()
        out.close()
    log = next((run_dir / "logs").glob("*.out")).read_text()
    followed = (tmp_path / "follow.txt").read_text()
    assert followed == log, "logs -f printed the file exactly once, across the requeue"
    starts = re.findall(r"fake_train: start at step (\d+)", log)
    assert starts[0] == "0" and int(starts[1]) >= 4 and "DUE TO JOB REQUEUE" in log
    assert "fake_train: finished 16 steps" in log
    data = json.loads(cli("queue", "--json", "--run-root", str(root), "--name", f"mon{SUFFIX}-rq",
                          env={"HPCQWEN_CACHE_DIR": str(tmp_path / "cache")}).stdout)
    (run,) = data["runs"]
    assert run["restarts"] == 1 and run["slurm_state"] == "COMPLETED" and run["progress"]["step"] == 16
