"""On each node: SLURM_* -> NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, then exec.

`srun --ntasks-per-node=1 hpcqwen launch RUN_DIR` runs this once per node. `launch_env` is
pure (environ dict + spec in, LaunchEnv out) and unit-tested over dicts; `main` prints one
summary line per node and `exec`s torchrun on the task's module (or the module directly for
a single process). Every backend (slurm, submitit, local) ends here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hpcqwen import __version__
from hpcqwen.paths import RunPaths
from hpcqwen.spec import JobSpec, read_frozen_spec

PORT_BASE, PORT_SPAN = 15000, 15000  # 15000-29999: unprivileged, below Linux's ephemeral range (32768+)


def expand_nodelist(text: str) -> list[str]:
    """Expand Slurm's compressed host lists: 'n[1-3,5],gpu-[01-02]' -> n1 n2 n3 n5 gpu-01 gpu-02."""
    hosts: list[str] = []
    for group in _split_outside_brackets(text.strip()):
        hosts += _expand_group(group)
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_group(group: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", group)
    if m is None:
        return [group]
    prefix, rest = group[: m.start()], group[m.end() :]
    values: list[str] = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.partition("-")
        if sep:
            values += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            values.append(item)
    return [prefix + v + tail for v in values for tail in _expand_group(rest)]


def master_port(job_id: str) -> int:
    """A port every node of one job derives alike; distinct for jobs (and array tasks) that
    share a node, since each array task has its own SLURM_JOB_ID."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def visible_gpus(environ: Mapping[str, str]) -> int:
    """GPUs Slurm gave this node's step (CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE)."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES", "")
    if cvd and cvd != "NoDevFiles":
        return len([d for d in cvd.split(",") if d.strip()])
    return int(environ.get("SLURM_GPUS_ON_NODE", "0") or 0)


@dataclass(frozen=True)
class LaunchEnv:
    """What one node's launcher decided."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int
    job_id: str
    array_index: int | None
    restart_count: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.nnodes * self.nproc_per_node


def launch_env(environ: Mapping[str, str], spec: JobSpec, run_dir: str) -> LaunchEnv:
    """Pure: the node's rendezvous and process layout from its environment and the spec."""
    in_slurm = "SLURM_JOB_ID" in environ
    nnodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1) if in_slurm else 1
    node_rank = int(environ.get("SLURM_NODEID", "0")) if in_slurm else 0
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    master_addr = expand_nodelist(nodelist)[0] if in_slurm and nodelist else "127.0.0.1"
    job_id = environ.get("SLURM_JOB_ID", environ.get("HPCQWEN_JOB_ID", "local"))
    port = int(environ["HPCQWEN_MASTER_PORT"]) if "HPCQWEN_MASTER_PORT" in environ else master_port(job_id)
    gpus = visible_gpus(environ) if spec.gpus_per_node else 0
    nproc = spec.resources.nproc_per_node or gpus or spec.nproc_per_node
    task = environ.get("SLURM_ARRAY_TASK_ID", "")
    array_index = int(task) if task.isdigit() else None
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    task_dir = RunPaths(Path(run_dir)).task(array_index if spec.array is not None else None).dir
    env = {
        "NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(port), "NPROC_PER_NODE": str(nproc),
        "HPCQWEN_RUN_DIR": run_dir, "HPCQWEN_TASK_DIR": str(task_dir), "HPCQWEN_JOB_ID": job_id,
        "HPCQWEN_RESTART_COUNT": str(restarts),
        "HPCQWEN_ARRAY_TASK_ID": "" if array_index is None else str(array_index),
    }
    if nnodes * nproc == 1:  # no torchrun: give the process torch.distributed's single-rank env
        env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    return LaunchEnv(nnodes, node_rank, master_addr, port, nproc, job_id, array_index, restarts, env)


def launch_argv(le: LaunchEnv, module: str, args: list[str], python: str = sys.executable) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, the same interpreter) or the module alone."""
    if le.world_size == 1:
        return [python, "-m", module, *args]
    return [python, "-m", "torch.distributed.run", f"--nnodes={le.nnodes}", f"--node_rank={le.node_rank}",
            f"--master_addr={le.master_addr}", f"--master_port={le.master_port}",
            f"--nproc_per_node={le.nproc_per_node}", "-m", module, *args]


def summary_line(le: LaunchEnv, spec_sha: str, environ: Mapping[str, str], argv: list[str]) -> str:
    """The one line each node prints before exec."""
    host = environ.get("SLURMD_NODENAME") or os.uname().nodename
    array = f" array task {le.array_index}" if le.array_index is not None else ""
    return (f"hpcqwen {__version__} launch: spec sha256 {spec_sha[:12]} job {le.job_id}{array} restart "
            f"{le.restart_count} node {le.node_rank}/{le.nnodes} ({host}) master {le.master_addr}:{le.master_port} "
            f"nproc {le.nproc_per_node} CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '')} "
            f"-> {' '.join(argv[1:])}")


def record_launch(paths: RunPaths, le: LaunchEnv, host: str) -> None:
    """Append this start to launches.jsonl (node rank 0 only: NFS appends from many clients race)."""
    if le.node_rank != 0:
        return
    line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "job_id": le.job_id,
            "array_index": le.array_index, "restart_count": le.restart_count, "nnodes": le.nnodes, "host": host}
    with open(paths.launches, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def main(run_dir: str) -> int:
    """Compute the env, print the summary, exec the task. Returns only if exec fails."""
    paths = RunPaths(Path(run_dir).resolve())
    raw = paths.spec_json.read_bytes()
    spec = read_frozen_spec(paths.spec_json)
    le = launch_env(os.environ, spec, str(paths.root))
    task = spec.task_for(le.array_index)
    argv = launch_argv(le, task.runner_module(), task.runner_args(str(paths.root)))
    print(summary_line(le, hashlib.sha256(raw).hexdigest(), os.environ, argv), flush=True)
    Path(le.env["HPCQWEN_TASK_DIR"]).mkdir(parents=True, exist_ok=True)
    record_launch(paths, le, os.environ.get("SLURMD_NODENAME") or os.uname().nodename)
    os.execvpe(argv[0], argv, {**os.environ, **le.env})
