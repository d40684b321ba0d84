"""On each node: SLURM_* -> the rendezvous and this node's ranks; start them, watch them, report.

`srun --ntasks-per-node=1 python -m hpcqwen launch RUN_DIR` runs this once per node (the local and
submitit backends run the same command). `launch_env` and `worker_env` are pure (environ dict +
spec in, decisions out) and unit-tested over dicts; `main`:
1. node 0 takes the task's launch lease (a second live launch of the same task is refused),
   records the start in `TASK_DIR/launches.jsonl` and publishes the rendezvous port;
2. starts NPROC_PER_NODE ranks of the task's module (`hpcqwen.supervisor`);
3. on SIGTERM/SIGUSR2/SIGINT touches STOP and passes the signal on: the ranks save and exit 75;
   when a rank crashes the others are killed at once (their collectives would hang on the dead
   peer) and the launcher exits with the crash's code, so `srun --kill-on-bad-exit` ends the job;
4. node 0 writes `TASK_DIR/OUTCOME` (done | stopped | failed), which the batch script reads to
   decide between exit and requeue; when the watchdog ended the attempt (`hpcqwen.nodewatch`: heartbeats,
   stack dumps, node 0's watcher), its OUTCOME (`requeued` or `hung`) stays and the launcher exits 124.
The launcher exits 0 when its ranks ended done or stopped: a non-zero exit would make
`--kill-on-bad-exit` kill the other nodes while they finish their part of the last save.

hpcqwen starts the ranks itself instead of through torchrun: torchrun answers SIGTERM by killing
its workers (SIGTERM, then SIGKILL 30 s later) and exiting with an error, which turned every
preemption into lost work; its workers also ran in their own sessions and outlived a killed launcher.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hpcqwen import __version__, cost, fs, lease, rollout, supervisor
from hpcqwen.nodewatch import NodeWatch
from hpcqwen.paths import RunPaths, TaskPaths
from hpcqwen.pipeline.outputs import resolve_on_node
from hpcqwen.spec import JobSpec, read_frozen_spec
from hpcqwen.watchdog import EXIT_HUNG

PORT_BASE, PORT_SPAN = 15000, 15000  # 15000-29999: unprivileged, below Linux's ephemeral range (32768+)
RENDEZVOUS_TIMEOUT_S = 300.0


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


def master_port(job_id: str, restart: int = 0, attempt: int = 0) -> int:
    """A candidate rendezvous port for a multi-node job, spread by a hash (job ids 100000 and 115000
    must not collide as they did with `id % span`); node 0 checks it is free and publishes the one it
    took (see `publish_rendezvous`), so a taken candidate moves it to the next."""
    digest = hashlib.sha256(f"{job_id}:{restart}:{attempt}".encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


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
    nproc_per_node: int
    job_id: str
    array_index: int | None
    restart_count: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.nnodes * self.nproc_per_node


def _cpus(environ: Mapping[str, str]) -> int:
    """CPUs this launcher may use: Slurm's grant, else this process's affinity."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if environ.get(key, "").isdigit():
            return int(environ[key])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launch_env(environ: Mapping[str, str], spec: JobSpec, run_dir: str) -> LaunchEnv:
    """Pure: the node's layout and the environment every rank of this node shares."""
    in_slurm = "SLURM_JOB_ID" in environ
    nnodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1) if in_slurm else 1
    nnodes = max(nnodes - spec.rollout_nodes, 1)  # the last nodes serve rollouts (GRPO task.rollout): no ranks
    node_rank = int(environ.get("SLURM_NODEID", "0")) if in_slurm else 0
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    master_addr = expand_nodelist(nodelist)[0] if in_slurm and nodelist and nnodes > 1 else "127.0.0.1"
    job_id = environ.get("SLURM_JOB_ID", environ.get("HPCQWEN_JOB_ID", "local"))
    gpus = visible_gpus(environ) if spec.gpus_per_node else 0
    nproc = spec.resources.nproc_per_node or gpus or spec.nproc_per_node
    task, offset = environ.get("SLURM_ARRAY_TASK_ID", ""), environ.get("HPCQWEN_ARRAY_OFFSET", "0")
    array_index = int(task) + (int(offset) if offset.isdigit() else 0) if task.isdigit() else None  # hpcqwen.arrays
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    task_dir = RunPaths(Path(run_dir)).task(array_index if spec.array is not None else None).dir
    env = {
        "NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": master_addr,
        "NPROC_PER_NODE": str(nproc), "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "HPCQWEN_RUN_DIR": run_dir, "HPCQWEN_TASK_DIR": str(task_dir), "HPCQWEN_JOB_ID": job_id,
        "HPCQWEN_RESTART_COUNT": str(restarts),
        "HPCQWEN_ARRAY_TASK_ID": "" if array_index is None else str(array_index),
    }
    if "OMP_NUM_THREADS" not in environ:
        # Without it every rank starts a thread per core: 7x slower on a 2-node CPU job here.
        env["OMP_NUM_THREADS"] = str(max(1, _cpus(environ) // max(nproc, 1)))
    return LaunchEnv(nnodes, node_rank, master_addr, nproc, job_id, array_index, restarts, env)


def worker_env(le: LaunchEnv, local_rank: int, master_port: int) -> dict[str, str]:
    """Pure: the variables of one rank (torch.distributed's env:// rendezvous reads them)."""
    rank = le.node_rank * le.nproc_per_node + local_rank
    return {**le.env, "RANK": str(rank), "LOCAL_RANK": str(local_rank), "MASTER_PORT": str(master_port)}


def summary_line(le: LaunchEnv, spec_sha: str, environ: Mapping[str, str], argv: list[str], port: int) -> str:
    """The one line each node prints before starting its ranks."""
    host = environ.get("SLURMD_NODENAME") or socket.gethostname()
    array = f" array task {le.array_index}" if le.array_index is not None else ""
    return (f"hpcqwen {__version__} launch: spec sha256 {spec_sha[:12]} job {le.job_id}{array} restart "
            f"{le.restart_count} node {le.node_rank}/{le.nnodes} ({host}) master {le.master_addr}:{port} "
            f"nproc {le.nproc_per_node} OMP_NUM_THREADS={le.env.get('OMP_NUM_THREADS', environ.get('OMP_NUM_THREADS'))}"
            f" CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '')} -> {' '.join(argv[1:])}")


# ---- rendezvous --------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """An unused TCP port on this machine (a single-node job's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_port(le: LaunchEnv, task: TaskPaths, environ: Mapping[str, str]) -> int:
    """The rendezvous port: HPCQWEN_MASTER_PORT if set; a free one for a single node; for several
    nodes, node 0 takes the first free candidate and publishes it, the others read it."""
    if environ.get("HPCQWEN_MASTER_PORT", "").isdigit():
        return int(environ["HPCQWEN_MASTER_PORT"])
    if le.nnodes == 1:
        return free_port()
    path = task.dir / ".rendezvous.json"
    key = {"job_id": le.job_id, "restart": le.restart_count}
    if le.node_rank == 0:
        port = next(p for p in (master_port(le.job_id, le.restart_count, a) for a in range(64)) if _port_free(p))
        fs.write_json_atomic(path, {**key, "addr": le.master_addr, "port": port})
        return port
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while time.monotonic() < deadline:
        data = fs.read_json(path)
        if isinstance(data, dict) and all(data.get(k) == v for k, v in key.items()) \
                and isinstance(data.get("port"), int):
            return int(data["port"])
        time.sleep(0.5)
    raise supervisor.LaunchError(f"node 0 published no rendezvous port in {path} within {RENDEZVOUS_TIMEOUT_S:.0f} s",
                                 hint="node 0's launcher did not start (see its log lines), or the run dir is "
                                 "not on a filesystem all nodes share")


def record_launch(task: TaskPaths, le: LaunchEnv, host: str, port: int) -> None:
    """Append this start to the task's launches.jsonl (node 0 only: one writer per file)."""
    line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "job_id": le.job_id,
            "array_index": le.array_index, "restart_count": le.restart_count, "nnodes": le.nnodes, "host": host,
            "port": port}
    fs.append_line(task.launches, json.dumps(line), durable=True)


def _lost_server(sup: supervisor.Supervisor, why: str) -> None:
    print(f"hpcqwen launch: {why}; killing the ranks (the job fails: a rank waiting on the server would hang)",
          file=sys.stderr, flush=True)
    sup.kill_all(signal.SIGKILL)


def node_watch(spec: JobSpec, le: LaunchEnv, task: TaskPaths, host: str, sup: supervisor.Supervisor,
               environ: Mapping[str, str]) -> NodeWatch | None:
    """This launcher's watchdog duties, when the spec turns the watchdog on."""
    if not spec.watchdog.enabled:
        return None
    from hpcqwen.watchconfig import Layout, WatchConfig

    in_slurm = "SLURM_JOB_ID" in environ
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    hosts = expand_nodelist(nodelist) if in_slurm and nodelist else [host]
    slurm_job = environ.get("SLURM_JOB_ID", "")
    if environ.get("SLURM_ARRAY_JOB_ID") and le.array_index is not None:
        slurm_job = f"{environ['SLURM_ARRAY_JOB_ID']}_{le.array_index}"
    layout = Layout(le.job_id, le.restart_count, le.nproc_per_node, tuple(hosts[: le.nnodes]), slurm_job)
    return NodeWatch(WatchConfig.from_spec(spec), layout, task, le.node_rank, host, sup)


def main(run_dir: str) -> int:
    """Start this node's ranks, supervise them, report the outcome; returns the launcher's exit code."""
    paths = RunPaths(Path(run_dir).resolve())
    resolve_on_node(paths.root)  # a pipeline stage: ${stages...} -> its producers' outputs, into spec.json
    raw = paths.spec_json.read_bytes()
    spec = read_frozen_spec(paths.spec_json)
    le = launch_env(os.environ, spec, str(paths.root))
    if os.environ.get("HPCQWEN_TEST_FAULT"):
        from hpcqwen import testing_faults

        testing_faults.launch_delay(le.node_rank, le.restart_count)  # test only: a node that starts late
    task = spec.task_for(le.array_index)
    task_paths = TaskPaths(Path(le.env["HPCQWEN_TASK_DIR"]))
    task_paths.dir.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    role = rollout.node_role(spec, le.node_rank, le.nnodes, "SLURM_JOB_ID" in os.environ)
    if role == "serve":  # a rollout node (GRPO task.rollout): no ranks, no lease, no OUTCOME
        return rollout.serve_node(spec, task, task_paths.dir, paths.root, le.job_id, le.restart_count, host)
    link = None if role is None else rollout.TrainerLink(spec, task, task_paths.dir, paths.root, le.job_id,
                                                         le.restart_count, cohost=role == "cohost")
    sup = supervisor.Supervisor(task_paths.stop)
    sup.install_handlers()  # from here a TERM is a stop request, also during the rendezvous
    held, watch, watched = None, None, None
    if le.node_rank == 0:
        held = lease.acquire(task_paths.lease, le.job_id, le.restart_count, what=f"task dir {task_paths.dir}")
    try:
        watch = node_watch(spec, le, task_paths, host, sup, os.environ)
        if watch is not None and le.nnodes > 1 and le.node_rank > 0:
            watch.phase("rendezvous")
        port = choose_port(le, task_paths, os.environ)
        argv = [sys.executable, "-m", task.runner_module(), *task.runner_args(str(paths.root))]
        print(summary_line(le, hashlib.sha256(raw).hexdigest(), os.environ, argv, port), flush=True)
        if le.node_rank == 0:
            record_launch(task_paths, le, host, port)
        extra = link.connect(os.environ, le.nproc_per_node) if link else {}  # waits until the server is healthy
        if watch is not None:
            extra = {**extra, **watch.env()}
        envs = [{**os.environ, **extra, **worker_env(le, r, port)} for r in range(le.nproc_per_node)]
        sup.start(argv, envs)
        if link is not None:
            link.start_watch(lambda why: _lost_server(sup, why))
        if held is not None:
            held.start_refreshing()
        if watch is not None:
            watch.start()
        result = sup.wait()
    finally:
        watched = watch.stop() if watch is not None else None
        if link is not None:
            link.close()
        if held is not None:
            held.release()
    if le.node_rank == 0 and watched is None:
        fs.write_atomic(task_paths.outcome, result.outcome_line(le.restart_count))
        cost.write_task_cost(paths.root, task_paths.dir, le.array_index)  # what is known now (hpcqwen cost redoes it)
    print(f"hpcqwen launch: node {le.node_rank}: ranks ended {result.describe()}"
          + (f"; the watchdog ended the attempt: {watched.split()[0]}" if watched else ""), flush=True)
    return EXIT_HUNG if watched else result.launcher_exit_code
