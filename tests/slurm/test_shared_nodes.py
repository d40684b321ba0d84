"""Shared nodes and site environments on the real local cluster (issue 13 items 9, 10, 15, 16):
two single-node multi-rank jobs on ONE node at once, a multi-node job whose first rendezvous port is
taken, a local run inside `salloc -N2`, a dead controller with a cluster profile and with the local
one, and OMP_NUM_THREADS on a 2-node CPU job.

Pinning: a spec has no nodelist (placing jobs on named nodes is a test's need, not a user's), so the
jobs are submitted behind a held "gate" job of this test (`depends_on`), pinned while they wait with
`scontrol update JobId=... NodeList=<node>`, and start together when the gate is released and ends.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import wait_until
from signal_helpers import submit

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_SLURM
from hpcqwen.launch import master_port

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
TAG = uuid.uuid4().hex[:6]  # other sessions' jobs share the cluster: every name here is unique


def allreduce_spec(write_spec, name: str, nodes: int, nproc: int, extra: str = "") -> Path:  # type: ignore[no-untyped-def]
    return write_spec(f"""
        name: {name}-{TAG}
        resources: {{nodes: {nodes}, nproc_per_node: {nproc}, time_limit_min: 5}}
        task: {{kind: command, module: hpcqwen.examples.allreduce}}
        {extra}
    """, f"{name}.yaml")


def gate() -> str:
    """A held job of this test; jobs that depend on it wait until `open_gate`."""
    return subprocess.run(["sbatch", "--hold", "--parsable", "-p", "debug", "-o", "/dev/null", "-J", f"gate-{TAG}",
                           "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip()


def open_gate(job: str) -> None:
    subprocess.run(["scontrol", "release", job], check=True)


def idle_node(cpus: int) -> str | None:
    """A node of partition debug with at least `cpus` idle CPUs (sinfo %C: alloc/idle/other/total)."""
    out = subprocess.run(["sinfo", "-N", "-h", "-p", "debug", "-o", "%N %C"], capture_output=True, text=True).stdout
    nodes = [(int(c.split("/")[1]), n) for n, c in (line.split() for line in out.splitlines())]
    best = max(nodes, default=(0, ""))
    return best[1] if best[0] >= cpus else None


def allreduce_lines(run_dir: Path) -> list[str]:
    return [line for p in (run_dir / "logs").glob("*.out") for line in p.read_text().splitlines()
            if line.startswith("allreduce ")]


def launches(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run_dir / "launches.jsonl").read_text().splitlines()]


def sacct_window(job: str) -> tuple[str, str, str]:
    """(state, start, end) from accounting (it lags the queue by a few seconds)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,Start,End,NodeList"],
                         capture_output=True, text=True).stdout.strip().split("|")
    return (out[0], out[1], out[2]) if len(out) >= 3 and out[2] not in ("", "Unknown") else ("", "", "")


# ---- item 9: ports on shared nodes ------------------------------------------------------------------

def test_two_single_node_multi_rank_jobs_on_one_node_both_finish(slurm_cluster: str, write_spec,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    door = gate()
    jobs = []
    try:
        for name in ("pair-a", "pair-b"):
            jobs.append(submit(capsys, allreduce_spec(write_spec, name, 1, 2, f"depends_on: ['{door}']")))
        node = wait_until(lambda: idle_node(4), 120, "a node with 4 idle CPUs")  # both jobs at once: 2 + 2
        for job, _ in jobs:
            subprocess.run(["scontrol", "update", f"JobId={job}", f"NodeList={node}"], check=True)
    finally:
        open_gate(door)
    for job, run_dir in jobs:
        rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=2)
        assert [r.slurm_state for r in rows] == ["COMPLETED"], (job, (run_dir / "logs").iterdir())
        lines = allreduce_lines(run_dir)
        assert len(lines) == 2 and all("sum=3 expected=3" in line for line in lines), lines
    ports = [launches(d)[0]["port"] for _, d in jobs]
    assert ports[0] != ports[1], ports  # each single-node job took a free port of its own
    windows = [wait_until(lambda j=j: sacct_window(j)[0] and sacct_window(j), 60, "accounting") for j, _ in jobs]
    (_, start_a, end_a), (_, start_b, end_b) = windows  # type: ignore[misc]
    assert start_a <= end_b and start_b <= end_a, windows  # they ran at the same time, on one node
    nodes = {subprocess.run(["sacct", "-n", "-X", "-P", "-j", j, "-o", "NodeList"], capture_output=True,
                            text=True).stdout.strip() for j, _ in jobs}
    assert nodes == {node}


def test_multi_node_job_moves_to_the_next_port_when_the_first_is_taken(slurm_cluster: str, write_spec,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    door = gate()
    taken = socket.socket()
    try:
        job, run_dir = submit(capsys, allreduce_spec(write_spec, "busyport", 2, 1, f"depends_on: ['{door}']"))
        first = master_port(job, 0, 0)
        taken.bind(("", first))  # node 0 is this machine (the fake nodes are all localhost)
        taken.listen()
    except OSError:
        pass  # already taken by someone else: as good for this test
    finally:
        open_gate(door)
    try:
        rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=2)
    finally:
        taken.close()
    assert [r.slurm_state for r in rows] == ["COMPLETED"]
    port = launches(run_dir)[0]["port"]
    assert port != first and port in [master_port(job, 0, a) for a in range(1, 64)], (first, port)
    lines = allreduce_lines(run_dir)
    assert len(lines) == 2 and all("sum=3 expected=3" in x and f":{port} " in x for x in lines), lines


# ---- item 10: a local run inside an allocation -----------------------------------------------------------

def test_local_run_inside_salloc_two_nodes_is_a_single_node_run(slurm_cluster: str, write_spec,
                                                                run_root: Path) -> None:
    spec = allreduce_spec(write_spec, "insalloc", 1, 2)
    proc = subprocess.run(["salloc", "-N2", "-p", "debug", "-t", "5", "-J", f"salloc-{TAG}", sys.executable, "-m",
                           "hpcqwen", "submit", str(spec), "--backend", "local", "--wait"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "Granted job allocation" in proc.stderr and proc.returncode == EXIT_OK, proc.stderr[-2000:]
    [run_dir] = [p.parent for p in run_root.glob("*/*/manifest.json")]
    log = (run_dir / "logs" / f"insalloc-{TAG}-local.out").read_text()
    assert " node 0/1 " in log and "node 1/" not in log, log  # SLURM_NNODES=2 was not taken for the run's
    lines = [x for x in log.splitlines() if x.startswith("allreduce ")]
    assert len(lines) == 2 and all("sum=3 expected=3" in x for x in lines), log


# ---- item 15: no silent fallback to the login node ------------------------------------------------------

def test_dead_controller_fails_a_cluster_profile_and_falls_back_only_for_the_local_one(
        slurm_cluster: str, run_root: Path, write_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).resolve().read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(conf.replace("SlurmctldPort=6817", "SlurmctldPort=6899"))  # nothing listens there
    monkeypatch.setenv("SLURM_CONF", str(dead))
    monkeypatch.setenv("HPCQWEN_CACHE_ROOT", str(tmp_path / "cache"))
    task = "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1', --step-seconds, '0.1']}"
    site = write_spec(f"name: site-{TAG}\ncluster: h100-8x\n{task}\n", "site.yaml")
    rc = main(["submit", str(site)])  # the default backend: auto
    out, err = capsys.readouterr()
    assert rc == EXIT_SLURM and err.startswith("error[controller]: no Slurm controller answers"), err
    assert "h100-8x" in err and "--backend local" in err and "submitted" not in out
    assert list(run_root.iterdir()) == []  # nothing written, nothing run
    here = write_spec(f"name: here-{TAG}\ncluster: local\n{task}\n", "here.yaml")
    rc = main(["submit", str(here), "--wait"])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    assert "backend: local (no Slurm controller answered `scontrol ping`)" in err
    assert re.search(r"submitted job local-\d+", out) and "COMPLETED" in out


# ---- item 16: threads per rank ----------------------------------------------------------------------

def test_two_node_cpu_job_gets_omp_threads_from_its_cpus_and_keeps_a_users(
        slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    derived = allreduce_spec(write_spec, "omp", 2, 1, "")
    derived.write_text(derived.read_text().replace("nproc_per_node: 1,", "nproc_per_node: 1, cpus_per_task: 3,"))
    kept = allreduce_spec(write_spec, "ompset", 2, 1, "env: {OMP_NUM_THREADS: '1'}")
    kept.write_text(kept.read_text().replace("nproc_per_node: 1,", "nproc_per_node: 1, cpus_per_task: 3,"))
    for spec, want in ((derived, "3"), (kept, "1")):
        assert main(["submit", str(spec), "--wait"]) == EXIT_OK, capsys.readouterr().err
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].split("run dir: ")[1])
        lines = allreduce_lines(run_dir)
        assert len(lines) == 2 and {re.search(r"node_rank=(\d)", x).group(1) for x in lines} == {"0", "1"}  # type: ignore[union-attr]
        # torch follows OMP_NUM_THREADS up to the cores it may use (this machine has fewer than the 3 CPUs
        # each fake node advertises)
        threads = min(int(want), len(os.sched_getaffinity(0)))
        assert all(f"omp={want} torch_threads={threads}" in x for x in lines), lines
