"""Where a prepared run dir goes: Slurm (sbatch), submitit, or this machine (local).

Every backend ends in the same command on the node, `<python> -m hpcqwen launch RUN_DIR`, so
there is one code path there. `choose_backend` implements `auto`: slurm when a controller
answers `scontrol ping`, else local.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

from hpcqwen import slurm
from hpcqwen.errors import ControllerUnreachable, HpcqwenError
from hpcqwen.paths import RunPaths
from hpcqwen.render import cpus_per_task, launcher_argv
from hpcqwen.spec import JobSpec

BACKENDS = ("slurm", "submitit", "local")


class Backend(Protocol):
    """Submits a prepared run dir; returns the job id(s)."""

    name: str

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]]) -> list[str]:
        """Start the job; raise HpcqwenError if nothing was submitted."""
        ...


@dataclass
class SlurmBackend:
    """`sbatch --parsable RUN_DIR/job.sbatch`: one call for a whole array."""

    run: slurm.RunCmd = slurm.run_cmd
    name: str = "slurm"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]]) -> list[str]:
        """Submit the rendered script (dependencies are already in its #SBATCH lines)."""
        return [slurm.sbatch(str(paths.sbatch), run=self.run)]


@dataclass
class SubmititBackend:
    """submitit's SlurmExecutor running the same launcher command on every node."""

    name: str = "submitit"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]]) -> list[str]:
        """Submit through submitit (it writes its own sbatch file under RUN_DIR/submitit)."""
        import submitit

        r, c = spec.resources, spec.cluster
        executor = submitit.SlurmExecutor(folder=str(paths.root / "submitit"),
                                          max_num_timeout=spec.requeue.max_restarts)
        extra: dict[str, str] = {"open-mode": "append", "chdir": str(paths.root)}
        dep = ",".join(f"{k}:{':'.join(v)}" for k, v in dependencies.items() if v)
        if dep:
            extra["dependency"] = dep
        for key in ("account", "qos"):
            if getattr(r, key) or getattr(c, key):
                extra[key] = str(getattr(r, key) or getattr(c, key))
        executor.update_parameters(
            job_name=spec.name, nodes=r.nodes, ntasks_per_node=1, cpus_per_task=cpus_per_task(spec),
            time=r.time_limit_min, gpus_per_node=spec.gpus_per_node or None,
            partition=r.partition or c.partition, mem=f"{int(r.mem_gb * 1024)}M" if r.mem_gb else None,
            setup=list(c.setup) + [f"export {k}={shlex.quote(v)}" for k, v in sorted({**c.env, **spec.env}.items())],
            stderr_to_stdout=True, signal_delay_s=spec.requeue.signal_lead_s,
            array_parallelism=(spec.array.throttle or spec.array.count) if spec.array else 256,
            additional_parameters=extra,
        )
        command = submitit.helpers.CommandFunction(launcher_argv(spec, paths.root), verbose=True)
        if spec.array is None:
            return [str(executor.submit(command).job_id)]
        with executor.batch():
            jobs = [executor.submit(command) for _ in range(spec.array.count)]
        return [str(jobs[0].job_id).split("_")[0]]


def free_port() -> int:
    """An unused TCP port on this machine (for the local backend's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalBackend:
    """No cluster: run the launcher here as a child process with a one-node environment.

    The child (`python -m hpcqwen.localrun RUN_DIR`) runs each array task in turn and writes
    the exit code to logs/local.rc, so `status` works after the submitting process is gone.
    """

    wait: bool = False
    name: str = "local"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]]) -> list[str]:
        """Start the run in the background (or in the foreground with `wait`)."""
        if any(dependencies.values()):
            raise HpcqwenError("the local backend cannot wait for Slurm jobs (depends_on)",
                               hint="submit with --backend slurm, or drop depends_on")
        log = paths.logs / f"{spec.name}-local.out"
        env = {**os.environ, **spec.cluster.env, **spec.env, "HPCQWEN_MASTER_PORT": str(free_port())}
        argv = [sys.executable, "-m", "hpcqwen.localrun", str(paths.root)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=paths.root, start_new_session=True)
        job_id = f"local-{proc.pid}"
        if self.wait:
            proc.wait()
        return [job_id]


def choose_backend(requested: str, spec: JobSpec, wait: bool = False,
                   run: slurm.RunCmd = slurm.run_cmd) -> tuple[Backend, str]:
    """The backend to use and why (printed by the CLI)."""
    name = spec.cluster.backend if requested == "auto" else requested
    if name == "auto":
        status = slurm.ping(run=run)
        if status:
            return SlurmBackend(run=run), f"slurm ({status.strip()})"
        return LocalBackend(wait=wait), "local (no Slurm controller answered `scontrol ping`)"
    if name in ("slurm", "submitit"):
        if not slurm.ping(run=run):
            raise ControllerUnreachable("no Slurm controller answers `scontrol ping`",
                                        hint="start the local cluster (cluster/local/up) or use --backend local")
        return (SlurmBackend(run=run) if name == "slurm" else SubmititBackend()), name
    if name == "local":
        return LocalBackend(wait=wait), "local (requested)"
    raise HpcqwenError(f"unknown backend {name!r}", hint=f"use one of auto, {', '.join(BACKENDS)}")


def local_status(paths: RunPaths, job_id: str) -> str:
    """RUNNING, COMPLETED or FAILED for a local-backend job."""
    if paths.local_rc.exists():
        return "COMPLETED" if paths.local_rc.read_text().strip() == "0" else "FAILED"
    pid = int(job_id.removeprefix("local-"))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "FAILED"  # gone without writing an exit code
    except PermissionError:
        pass
    return "RUNNING"
