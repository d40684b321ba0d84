"""The launcher's pure part over environment dicts, and the nodelist expander against Slurm's forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcqwen.launch import expand_nodelist, launch_env, master_port, visible_gpus, worker_env
from hpcqwen.spec import load_spec

# Forms from the Slurm docs (hostlist expressions, `scontrol show hostnames`).
NODELISTS = [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2,5]", ["n1", "n2", "n5"]),
    ("gpu-[001-003]", ["gpu-001", "gpu-002", "gpu-003"]),
    ("linux[0-1],mic[0-1]", ["linux0", "linux1", "mic0", "mic1"]),
    ("tux[2,1-2]", ["tux2", "tux1", "tux2"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("a1,b[8-10]", ["a1", "b8", "b9", "b10"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
]


@pytest.mark.parametrize(("text", "hosts"), NODELISTS)
def test_expand_nodelist(text: str, hosts: list[str]) -> None:
    assert expand_nodelist(text) == hosts


def test_master_port_is_stable_spread_and_unprivileged() -> None:
    ports = {master_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) >= 99 and all(15000 <= p < 30000 for p in ports)
    assert master_port("1234") == master_port("1234")
    # ids a modulo would map to one port (100000 % 15000 == 115000 % 15000) get different ones
    assert len({master_port(j) for j in ("100000", "115000", "130000")}) == 3
    assert master_port("1234", restart=1) != master_port("1234") != master_port("1234", attempt=1)


def test_visible_gpus() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == 4
    assert visible_gpus({"SLURM_GPUS_ON_NODE": "2"}) == 2
    assert visible_gpus({}) == 0


def _spec(write_spec, text: str):  # noqa: ANN202
    return load_spec(write_spec(text))


def test_two_node_gpu_job(write_spec) -> None:
    spec = _spec(write_spec, "name: t\nresources: {nodes: 2, gpus_per_node: 4}\ntask: {kind: command, module: m}\n")
    environ = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_RESTART_COUNT": "2",
               "SLURM_CPUS_PER_TASK": "32"}
    le = launch_env(environ, spec, "/runs/r")
    assert (le.nnodes, le.node_rank, le.master_addr, le.nproc_per_node, le.world_size) == (2, 1, "gpu07", 4, 8)
    assert le.restart_count == 2
    assert le.env["NODE_RANK"] == "1" and le.env["MASTER_ADDR"] == "gpu07" and le.env["NPROC_PER_NODE"] == "4"
    assert le.env["WORLD_SIZE"] == "8" and le.env["LOCAL_WORLD_SIZE"] == "4"
    assert le.env["OMP_NUM_THREADS"] == "8"  # 32 CPUs Slurm gave the node's launcher / 4 ranks
    assert "RANK" not in le.env
    ranks = [worker_env(le, r, 29500) for r in range(4)]
    assert [w["RANK"] for w in ranks] == ["4", "5", "6", "7"]
    assert [w["LOCAL_RANK"] for w in ranks] == ["0", "1", "2", "3"]
    assert {w["MASTER_PORT"] for w in ranks} == {"29500"}


def test_omp_num_threads_set_by_the_user_is_kept(write_spec) -> None:
    spec = _spec(write_spec, "name: t\nresources: {nproc_per_node: 2}\ntask: {kind: command, module: m}\n")
    le = launch_env({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "3"}, spec, "/r")
    assert "OMP_NUM_THREADS" not in le.env  # the launcher passes the caller's environment through
    le = launch_env({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "8"}, spec, "/r")
    assert le.env["OMP_NUM_THREADS"] == "4"


def test_cpu_job_takes_nproc_from_the_spec(write_spec) -> None:
    spec = _spec(write_spec, "name: t\nresources: {nproc_per_node: 3}\ntask: {kind: command, module: m}\n")
    le = launch_env({"SLURM_JOB_ID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1"}, spec, "/r")
    assert le.nproc_per_node == 3 and le.world_size == 3
    assert le.master_addr == "127.0.0.1"  # one node: the rendezvous stays on this host


def test_single_process_outside_slurm(write_spec) -> None:
    spec = _spec(write_spec, "name: t\ntask: {kind: command, module: m, args: [x]}\n")
    le = launch_env({}, spec, "/r")  # local backend: no SLURM_* at all
    assert (le.nnodes, le.master_addr, le.world_size) == (1, "127.0.0.1", 1)
    assert worker_env(le, 0, 1234)["RANK"] == "0" and le.env["WORLD_SIZE"] == "1"


def test_array_task_gets_its_own_task_dir(write_spec) -> None:
    spec = _spec(write_spec, "name: t\narray: {size: 4}\ntask: {kind: command, module: m}\n")
    le = launch_env({"SLURM_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "n2"}, spec, "/r")
    assert le.array_index == 3 and le.env["HPCQWEN_TASK_DIR"] == str(Path("/r/tasks/3"))
    assert le.env["HPCQWEN_ARRAY_TASK_ID"] == "3"
