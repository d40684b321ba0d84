"""Preflight: will this job start, fit and finish? Everything checked outside the spec itself, before it queues.

`hpcqwen check SPEC|PIPELINE` runs it all and prints what passed with its numbers; `submit` (and
`pipeline submit`) run it on every spec and refuse on an error, printing warnings. The spec models
stay pure (`spec.py`, `tasks/`); what reads files, imports plugins or asks the cluster is here:
- `files`: model folders, datasets, reward plugins, DeepSpeed files, vLLM, Megatron shapes (passed to
  `parse_spec` as `extra`, so one message lists them with the spec's own problems);
- `cluster`: partition up, a node that fits (GPUs by GRES type, CPUs, memory), time ≤ MaxTime,
  `sbatch --test-only` (account, QOS), the array against MaxArraySize;
- `sizing`: memory per GPU against the GPU's, checkpoint space, writable run and cache roots;
- `timing`: the signal lead against a measured (or estimated) step plus save;
- `probe` (opt-in): a tiny job that looks at the roots, model and data from a compute node.
"""

from __future__ import annotations

import sys
from typing import TextIO

from hpcqwen import slurm
from hpcqwen.errors import SpecError
from hpcqwen.preflight.cluster import check_cluster
from hpcqwen.preflight.files import file_problems, input_problems
from hpcqwen.preflight.report import Report
from hpcqwen.preflight.sizing import check_disk, check_memory, check_roots
from hpcqwen.preflight.timing import signal_lead_problems
from hpcqwen.spec import JobSpec, SpecSource, parse_spec, problem_issues

__all__ = ["Report", "checked_spec", "file_problems", "input_problems", "raise_errors", "run_checks", "show_warnings",
           "signal_lead_problems"]


def checked_spec(source: SpecSource, *, stage_refs: bool = False) -> JobSpec:
    """The validated spec, its files checked too: one SpecError lists every problem."""
    return parse_spec(source, file_problems, stage_refs=stage_refs)


def rendered_spec(source: SpecSource) -> JobSpec:
    """The validated spec with the inputs submit would copy checked (`hpcqwen render`: no data or model
    needs to be on disk to render)."""
    return parse_spec(source, input_problems)


def run_checks(spec: JobSpec, *, cluster: bool, probe: bool = False, probe_timeout_s: float = 120.0,
               run: slurm.RunCmd = slurm.run_cmd) -> Report:
    """Every check beyond the spec's files (those run in `checked_spec`); `cluster`: ask Slurm too."""
    report = Report()
    errors, warnings = signal_lead_problems(spec)
    for text in errors:
        report.error("requeue.signal_lead_s", text)
    for text in warnings:
        report.warn("requeue.signal_lead_s", text)
    if not errors and not warnings and spec.requeue.enabled:
        report.ok(f"requeue.signal_lead_s {spec.requeue.signal_lead_s} s: no measured or estimated step + save "
                  "longer than it")
    check_roots(spec, report)
    check_disk(spec, report)
    types = check_cluster(spec, report, run) if cluster else []
    check_memory(spec, types, report, here=not cluster)
    if probe:
        from hpcqwen.preflight.probe import run_probe

        run_probe(spec, report, timeout_s=probe_timeout_s, run=run)
    return report


def raise_errors(source: SpecSource, report: Report) -> None:
    """A SpecError with every error of `report`, each at its key's line of the spec (nothing when none)."""
    if report.errors:
        raise SpecError(source.path, problem_issues(source, report.errors))


def show_warnings(report: Report, name: str, out: TextIO = sys.stderr) -> None:
    """`warning: <spec>: <key>: <what>` lines."""
    for w in report.warnings:
        hint = f"; hint: {w.hint}" if w.hint else ""
        print(f"warning: {name}: {w.key}: {w.message}{hint}", file=out)
