"""`hpcqwen check SPEC|PIPELINE [--probe]`: will it start, fit and finish? Every check, with its numbers.

The same checks `submit` runs (spec, files, cluster, memory, disk, signal lead), printed whether
they pass or not; `--probe` adds a tiny job that looks at the paths from a compute node. Exit 1
when a check fails (nothing is submitted either way), 0 otherwise.
"""

from __future__ import annotations

import argparse

from hpcqwen import preflight, slurm
from hpcqwen.cli._common import add_spec_arguments
from hpcqwen.errors import EXIT_OK, HpcqwenError
from hpcqwen.pipeline import control
from hpcqwen.pipeline.definition import is_pipeline_file, load_pipeline
from hpcqwen.preflight import Report
from hpcqwen.spec import read_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SPEC|PIPELINE [--set ...] [--probe] [--probe-timeout S]."""
    add_spec_arguments(p)
    p.add_argument("--probe", action="store_true", help="also submit a tiny job that checks the run root, cache "
                   "root, model and data from a compute node (reported with its latency)")
    p.add_argument("--probe-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the probe's answer (default 120)")


def _show(name: str, report: Report) -> None:
    for text in report.passed:
        print(f"  ok       {name}{text}")
    for w in report.warnings:
        print(f"  warning  {name}{w.key}: {w.message}" + (f" — {w.hint}" if w.hint else ""))
    for e in report.errors:
        print(f"  error    {name}{e.key}: {e.message}")


def run(args: argparse.Namespace) -> int:
    """Check a spec or a pipeline; errors end as one SpecError (exit 1)."""
    cluster = slurm.ping() is not None
    if not cluster:
        print("  warning  no Slurm controller answers `scontrol ping`: the cluster checks are skipped")
    if is_pipeline_file(args.spec):
        if args.overrides:
            raise HpcqwenError("--set applies to job specs; a pipeline's stages take `set:` in the pipeline file",
                               where=args.spec)
        pipeline = load_pipeline(args.spec)
        reports = control.check_pipeline(pipeline, cluster=cluster, probe=args.probe)
        for name, report in reports.items():
            _show(f"[{name}] ", report)
        control.raise_errors(pipeline, reports)
        print(f"check: {args.spec}: {len(reports)} stages, no problems")
        return EXIT_OK
    source = read_source(args.spec, tuple(args.overrides))
    spec = preflight.checked_spec(source)
    report = preflight.run_checks(spec, cluster=cluster, probe=args.probe, probe_timeout_s=args.probe_timeout)
    _show("", report)
    preflight.raise_errors(source, report)
    print(f"check: {args.spec}: no problems ({len(report.passed)} checks passed, {len(report.warnings)} warnings)")
    return EXIT_OK
