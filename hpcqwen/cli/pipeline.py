"""`hpcqwen pipeline submit FILE | status DIR | cancel DIR | resume DIR`: a chain of stages as one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcqwen import backends, slurminfo
from hpcqwen.errors import EXIT_OK, HpcqwenError, JobFailed, RunDirError
from hpcqwen.pipeline import control
from hpcqwen.pipeline.definition import load_pipeline
from hpcqwen.pipeline.record import is_pipeline_dir, read_record
from hpcqwen.preflight import show_warnings
from hpcqwen.spec import JobSpec, read_frozen_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """submit FILE [--backend] [--wait] | status DIR | cancel DIR | resume DIR [--wait]."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("submit", help="check every stage, then submit them all with dependencies")
    s.add_argument("file", help="pipeline YAML file (pipelines/*.yaml)")
    for name in ("status", "cancel", "resume"):
        sub.add_parser(name, help=f"{name} the stages of a pipeline dir").add_argument("dir", help="pipeline dir")
    for q in (s, sub.choices["resume"]):
        q.add_argument("--backend", default="auto", choices=["auto", "slurm", "submitit"])
        q.add_argument("--wait", action="store_true", help="wait for every stage; exit 3 unless all COMPLETED")


def _pipeline_dir(text: str) -> Path:
    path = Path(text).expanduser().resolve()
    if not is_pipeline_dir(path):
        raise RunDirError(f"{text} is not a pipeline dir (no pipeline.json)",
                          hint="give the dir that `hpcqwen pipeline submit` printed")
    return path


def _backend(requested: str, spec: JobSpec) -> tuple[backends.Backend, int | None]:
    backend, why = backends.choose_backend(requested, spec)
    if backend.name == "local":
        raise HpcqwenError("a pipeline needs Slurm: its stages wait for each other through sbatch --dependency",
                           hint="start the cluster (cluster/local/up) or use a Slurm login node")
    print(f"backend: {why}", file=sys.stderr)
    return backend, slurminfo.max_array_size(spec.cluster.max_array_size)[0]


def print_status(pdir: Path) -> list[control.StageStatus]:
    """One line per stage: state, jobs, what it waits for, its run dir."""
    statuses = control.pipeline_status(pdir)
    print(f"pipeline {read_record(pdir).name}: {control.overall_state(statuses)}  ({pdir})")
    for s in statuses:
        why = s.blocked_on or s.reason
        print(f"  {s.name:<12} {s.kind:<8} {s.state:<13} {','.join(s.job_ids) or '-':<14} {why:<32} {s.run_dir}")
    return statuses


def _wait(pdir: Path) -> int:
    control.wait_pipeline(pdir)
    statuses = print_status(pdir)
    bad = [s for s in statuses if s.state != "COMPLETED"]
    if bad:
        raise JobFailed(f"pipeline ended with stage {bad[0].name} {bad[0].state}" + (f" ({bad[0].blocked_on})"
                        if bad[0].blocked_on else ""), where=str(pdir), hint=f"`hpcqwen pipeline resume {pdir}`")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Dispatch the action."""
    if args.action == "submit":
        pipeline = load_pipeline(args.file)
        first = next(iter(pipeline.stages.values())).spec
        backend, limit = _backend(args.backend, first)
        reports = control.check_pipeline(pipeline, cluster=True)
        for name, report in reports.items():
            show_warnings(report, f"{args.file} [{name}]")
        control.raise_errors(pipeline, reports)
        pdir, jobs = control.submit_pipeline(pipeline, backend, limit)
        print(f"submitted pipeline {pipeline.name}: " + ", ".join(f"{n} {','.join(j)}" for n, j in jobs.items()))
        print(f"pipeline dir: {pdir}")
    elif args.action == "status":
        print_status(_pipeline_dir(args.dir))
        return EXIT_OK
    elif args.action == "cancel":
        pdir = _pipeline_dir(args.dir)
        print(f"cancelled stages: {', '.join(control.cancel_pipeline(pdir)) or 'none (nothing was queued or running)'}")
        return EXIT_OK
    else:
        pdir = _pipeline_dir(args.dir)
        stage_dir = Path(next(iter(read_record(pdir).stages.values())).run_dir)
        backend, limit = _backend(args.backend, read_frozen_spec(stage_dir / "spec.json"))
        jobs = control.resume_pipeline(pdir, backend, limit)
        print("resumed: " + ", ".join(f"{n} {','.join(j)}" for n, j in jobs.items()))
    return _wait(pdir) if args.wait else EXIT_OK
