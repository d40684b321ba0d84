"""`hpcqwen prepare SPEC`: build the tokenization/packing cache of a training spec as its own CPU job.

The job runs the same runner with HPCQWEN_PREPARE_ONLY=1 on one CPU process; a training spec then
waits for it with `depends_on: [<the run dir printed here>]` (afterok), or simply finds the cache.
"""

from __future__ import annotations

import argparse
import sys

from hpcqwen import backends
from hpcqwen.cli._common import add_spec_arguments
from hpcqwen.errors import HpcqwenError
from hpcqwen.preflight import checked_spec
from hpcqwen.spec import JobSpec, read_source
from hpcqwen.submit import submit

PREPARABLE = ("sft", "megatron")


def prepare_spec(spec: JobSpec) -> JobSpec:
    """The CPU job that only builds the data cache of `spec`."""
    if spec.task.kind not in PREPARABLE:
        raise HpcqwenError(f"task kind {spec.task.kind!r} has no data cache to prepare",
                           hint=f"prepare works for {', '.join(PREPARABLE)} specs")
    cpus = getattr(spec.task, "dataset_num_proc", 1)
    resources = spec.resources.model_copy(update={"nodes": 1, "gpus_per_node": 0, "nproc_per_node": 1,
                                                  "cpus_per_task": cpus})
    return spec.model_copy(update={"name": f"{spec.name}-prepare", "resources": resources, "array": None,
                                   # a data build has no training steps: nothing for the hang watchdog to watch
                                   "watchdog": spec.watchdog.model_copy(update={"enabled": False}),
                                   "env": {**spec.env, "HPCQWEN_PREPARE_ONLY": "1"}})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SPEC [--set ...] [--backend ...] [--wait]."""
    add_spec_arguments(p)
    p.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    p.add_argument("--wait", action="store_true", help="wait for the cache job to finish")


def run(args: argparse.Namespace) -> int:
    """Submit the preparation job; print its run dir (for depends_on)."""
    source = read_source(args.spec, tuple(args.overrides))
    spec = prepare_spec(checked_spec(source))  # the data must exist before a job is queued to tokenize it
    backend, why = backends.choose_backend(args.backend, spec, wait=args.wait)
    print(f"backend: {why}", file=sys.stderr)
    sub = submit(spec, source, backend)
    print(f"submitted job {', '.join(sub.job_ids)}  run dir: {sub.run_dir}")
    print(f"  training specs can wait for it with: depends_on: ['{sub.run_dir}']", file=sys.stderr)
    if args.wait:
        from hpcqwen import runs

        rows = runs.wait_for(runs.resolve_target(str(sub.run_dir)))
        if any(r.slurm_state != "COMPLETED" for r in rows):
            from hpcqwen.errors import JobFailed

            raise JobFailed(f"cache job {sub.job_ids[0]} ended {rows[0].slurm_state}", where=str(sub.run_dir))
        print(f"cache ready  run dir: {sub.run_dir}")
    return 0
