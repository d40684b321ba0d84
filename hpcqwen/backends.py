"""Where a prepared run dir goes: Slurm (sbatch), submitit, or this machine (local).

Every backend ends in the same command on the node, `<python> -m hpcqwen launch RUN_DIR`, so
there is one code path there. `choose_backend` implements `auto`: slurm when a controller
answers `scontrol ping`; else local for the `local` profile only, an error for any other.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

from hpcqwen import slurm
from hpcqwen.containers import node_python
from hpcqwen.errors import ControllerUnreachable, HpcqwenError
from hpcqwen.paths import RunPaths
from hpcqwen.render import cpus_per_task, launcher_argv, pyxis_args, setup_lines
from hpcqwen.spec import JobSpec

BACKENDS = ("slurm", "submitit", "local")


class Backend(Protocol):
    """Submits a prepared run dir; returns the job id(s)."""

    name: str

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]],
               array_indices: list[int] | None = None) -> list[str]:
        """Start the job (only these array tasks, when given); raise HpcqwenError if nothing was submitted."""
        ...


@dataclass
class SlurmBackend:
    """`sbatch --parsable RUN_DIR/job.sbatch`: one call for a whole array."""

    run: slurm.RunCmd = slurm.run_cmd
    name: str = "slurm"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]],
               array_indices: list[int] | None = None) -> list[str]:
        """Submit the rendered script (dependencies and array tasks are already in its #SBATCH lines)."""
        return [slurm.sbatch(str(paths.sbatch), run=self.run)]


@dataclass
class SubmititBackend:
    """submitit's SlurmExecutor running the same launcher command on every node.

    The job function is `hpcqwen.requeue.SubmititLaunch`: it runs the launcher and then applies the
    batch script's requeue rule, so a stop saves, requeues and resumes as on the sbatch backend.
    """

    name: str = "submitit"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]],
               array_indices: list[int] | None = None) -> list[str]:
        """Submit through submitit (it writes its own sbatch file under RUN_DIR/submitit)."""
        import submitit

        from hpcqwen.requeue import SubmititLaunch

        r, c = spec.resources, spec.cluster
        # In a pyxis container submitit's own job runner runs inside it too: the image's interpreter.
        pyxis = pyxis_args(spec, paths.root)
        executor = submitit.SlurmExecutor(folder=str(paths.root / "submitit"),
                                          max_num_timeout=spec.requeue.max_restarts,
                                          python=shlex.quote(node_python(spec)) if pyxis else None)
        extra: dict[str, str] = {"open-mode": "append", "chdir": str(paths.root)}
        dep = ",".join(f"{k}:{':'.join(v)}" for k, v in dependencies.items() if v)
        if dep:
            extra["dependency"] = dep
        for key in ("account", "qos"):
            if getattr(r, key) or getattr(c, key):
                extra[key] = str(getattr(r, key) or getattr(c, key))
        if r.constraint:
            extra["constraint"] = r.constraint
        executor.update_parameters(
            job_name=spec.name, nodes=r.nodes, ntasks_per_node=1, cpus_per_task=cpus_per_task(spec),
            time=r.time_limit_min, gpus_per_node=spec.gpus_per_node or None,
            partition=r.partition or c.partition, mem=f"{int(r.mem_gb * 1024)}M" if r.mem_gb else None,
            setup=setup_lines(c.setup) + [f"export {k}={shlex.quote(v)}"
                                          for k, v in sorted({**c.env, **spec.env}.items())],
            stderr_to_stdout=True, signal_delay_s=spec.requeue.signal_lead_s,
            array_parallelism=(spec.array.throttle or spec.array.count) if spec.array else 256,
            additional_parameters=extra, srun_args=pyxis,
        )
        if spec.requeue.enabled:
            executor.update_parameters(additional_parameters={**extra, "requeue": True})
        def job(index: int | None) -> SubmititLaunch:
            return SubmititLaunch(launcher_argv(spec, paths.root), str(paths.root), index, spec.requeue.max_restarts,
                                  spec.requeue.enabled, spec.requeue.on_failure)
        if spec.array is None:
            return [str(executor.submit(job(None)).job_id)]
        indices = array_indices if array_indices is not None else list(range(spec.array.count))
        with executor.batch():  # one sbatch --array=0-(k-1); task k runs the k-th submission
            jobs = [executor.submit(job(i)) for i in indices]
        return [str(jobs[0].job_id).split("_")[0]]


def local_env(environ: dict[str, str], spec: JobSpec) -> dict[str, str]:
    """The local run's environment: the caller's without SLURM_* (inside `salloc -N2` they would make
    the launcher wait for a second node that never comes), plus the spec's env."""
    clean = {k: v for k, v in environ.items() if not k.startswith("SLURM_")}
    return {**clean, **spec.cluster.env, **spec.env}


@dataclass
class LocalBackend:
    """No cluster: run the launcher here as a child process with a one-node environment.

    The child (`python -m hpcqwen.localrun RUN_DIR`) runs each array task in turn and writes
    the exit code to logs/local.rc, so `status` works after the submitting process is gone.
    """

    wait: bool = False
    name: str = "local"

    def submit(self, spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]],
               array_indices: list[int] | None = None) -> list[str]:
        """Start the run in the background (or in the foreground with `wait`); finished array tasks
        are skipped by localrun itself."""
        if any(dependencies.values()):
            raise HpcqwenError("the local backend cannot wait for Slurm jobs (depends_on)",
                               hint="submit with --backend slurm, or drop depends_on")
        log = paths.logs / f"{spec.name}-local.out"
        argv = [sys.executable, "-m", "hpcqwen.localrun", str(paths.root)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=local_env(dict(os.environ), spec), cwd=paths.root, start_new_session=True)
        job_id = f"local-{proc.pid}"
        if self.wait:
            proc.wait()
        return [job_id]


def choose_backend(requested: str, spec: JobSpec, wait: bool = False,
                   run: slurm.RunCmd = slurm.run_cmd) -> tuple[Backend, str]:
    """The backend to use and why (printed by the CLI).

    `auto` falls back to running here only for the `local` profile (this machine's own cluster);
    on any other profile an unreachable controller is an error, never a training run on the login node.
    """
    name = spec.cluster.backend if requested == "auto" else requested
    if name == "auto":
        status = slurm.ping(run=run)
        if status:
            return SlurmBackend(run=run), f"slurm ({status.strip()})"
        if spec.cluster.profile != "local":
            raise ControllerUnreachable(
                f"no Slurm controller answers `scontrol ping` (profile '{spec.cluster.profile}')",
                hint="check the controller (`scontrol ping`) or your SLURM_CONF; to run on this machine on "
                "purpose, pass --backend local")
        return LocalBackend(wait=wait), "local (no Slurm controller answered `scontrol ping`)"
    if name in ("slurm", "submitit"):
        if not slurm.ping(run=run):
            raise ControllerUnreachable("no Slurm controller answers `scontrol ping`",
                                        hint="start the local cluster (cluster/local/up) or use --backend local")
        return (SlurmBackend(run=run) if name == "slurm" else SubmititBackend()), name
    if name == "local":
        return LocalBackend(wait=wait), "local (requested)"
    raise HpcqwenError(f"unknown backend {name!r}", hint=f"use one of auto, {', '.join(BACKENDS)}")


