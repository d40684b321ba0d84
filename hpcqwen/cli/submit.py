"""`hpcqwen submit SPEC [--wait]`: validate, preflight, make the run dir, submit; optionally wait."""

from __future__ import annotations

import argparse
import sys

from hpcqwen import backends, preflight, runs, slurm, slurminfo
from hpcqwen.cli._common import add_spec_arguments
from hpcqwen.errors import EXIT_OK
from hpcqwen.spec import read_source
from hpcqwen.submit import submit
from hpcqwen.tasks import spec_warnings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SPEC [--set ...] [--backend ...] [--wait]."""
    add_spec_arguments(p)
    p.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS],
                   help="auto (default): slurm when a controller answers, else local")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 3 unless it COMPLETED")


def _print_rows(rows: list[slurm.JobRow]) -> None:
    states = ", ".join(f"{r.job_id} {r.slurm_state}" + (f" ({r.reason})" if r.reason else "") for r in rows)
    print(f"  {states}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Check (spec, files, cluster), submit; with --wait, follow the state and report how it ended."""
    source = read_source(args.spec, tuple(args.overrides))
    spec = preflight.checked_spec(source)
    for w in spec_warnings(spec):
        print(f"warning: {args.spec}: {w.key}: {w.message} (got {w.got}); hint: {w.hint}", file=sys.stderr)
    backend, why = backends.choose_backend(args.backend, spec, wait=args.wait)
    report = preflight.run_checks(spec, cluster=backend.name != "local")
    preflight.show_warnings(report, args.spec)
    preflight.raise_errors(source, report)
    print(f"backend: {why}", file=sys.stderr)
    limit = slurminfo.max_array_size(spec.cluster.max_array_size)[0] if spec.array and backend.name == "slurm" \
        else None
    sub = submit(spec, source, backend, limit)
    print(f"submitted job {', '.join(sub.job_ids)}  run dir: {sub.run_dir}")
    if not args.wait:
        return EXIT_OK
    ref = runs.resolve_target(str(sub.run_dir))
    runs.check_completed(ref, runs.wait_for(ref, on_change=_print_rows), sub.job_ids[0])
    print(f"job {sub.job_ids[0]} COMPLETED  run dir: {sub.run_dir}")
    return EXIT_OK
