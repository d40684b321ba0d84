"""`hpcqwen sweep report RUN_DIR [--sort METRIC] [--csv FILE]`: one row per task of a sweep."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcqwen import sweep_report
from hpcqwen.errors import EXIT_OK, RunDirError
from hpcqwen.fs import write_atomic
from hpcqwen.paths import is_run_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """report RUN_DIR [--sort METRIC] [--csv FILE]."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("report", help="swept values, state, losses or reward, tokens/s and GPU-hours per task")
    r.add_argument("run_dir", help="run dir of a spec with sweep: (or any array)")
    r.add_argument("--sort", choices=sweep_report.METRICS, default=None, help="best first by this metric")
    r.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write the rows as CSV")


def run(args: argparse.Namespace) -> int:
    """Print the table (and write the CSV)."""
    run_dir = Path(args.run_dir).expanduser().resolve()
    if not is_run_dir(run_dir):
        raise RunDirError(f"{args.run_dir} is not an hpcqwen run dir (no spec.json)",
                          hint="give the run dir that `hpcqwen submit` printed")
    keys, rows = sweep_report.report_rows(run_dir)
    rows = sweep_report.sort_rows(rows, args.sort)
    print("\n".join(sweep_report.table_lines(keys, rows)))
    if args.csv:
        write_atomic(args.csv, sweep_report.to_csv(keys, rows))
        print(f"wrote {args.csv}")
    return EXIT_OK
