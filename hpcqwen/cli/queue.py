"""`hpcqwen queue`: a live view of hpcqwen runs and their training progress.

squeue is asked only for what is shown (`--me`: the user's jobs; otherwise the user's jobs and
the run root's other jobs, never the whole queue), once per refresh for every terminal of the user
(hpcqwen.polling); sacct only for jobs that left the queue, its answers shared too. `--once` prints one frame (for
scripts and CI), `--json` the same data as JSON.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from hpcqwen.cluster import default_run_root
from hpcqwen.errors import EXIT_OK, EXIT_SLURM
from hpcqwen.monitor import DEFAULT_RECENT_H, Watch, to_json
from hpcqwen.monitor_view import filter_rows, render_table
from hpcqwen.polling import DEFAULT_INTERVAL_S, MIN_INTERVAL_S


def add_arguments(p: argparse.ArgumentParser) -> None:
    """[--once] [--json] [--me] [--name PAT] [--state S] [--interval S] [--run-root DIR] [--since-hours H]."""
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--json", action="store_true", help="print the data of one frame as JSON and exit")
    p.add_argument("--me", action="store_true", help="only my jobs (default: mine and the other users' runs "
                   "under the run root)")
    p.add_argument("--name", default="", metavar="PAT", help="run name glob (or substring)")
    p.add_argument("--state", action="append", default=[], metavar="S",
                   help="only runs in this state: a Slurm state (PENDING, TIMEOUT, ...) or a folded one "
                        "(RUNNING, FAILED, SUCCEEDED, ...); repeatable or comma-separated")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                   help=f"seconds between squeue calls (default {DEFAULT_INTERVAL_S:.0f}, "
                        f"minimum {MIN_INTERVAL_S:.0f})")
    p.add_argument("--run-root", type=Path, default=None,
                   help="also show recent run dirs under this folder whose jobs left the queue "
                        "(default: HPCQWEN_RUN_ROOT, else the `local` profile's run_root)")
    p.add_argument("--since-hours", type=float, default=DEFAULT_RECENT_H, metavar="H",
                   help=f"how far back the run root is searched (default {DEFAULT_RECENT_H:.0f})")


def run(args: argparse.Namespace) -> int:
    """One frame (--once, --json, or stdout not a terminal), else the full-screen view."""
    if args.interval < MIN_INTERVAL_S:
        print(f"hpcqwen queue: --interval {args.interval:g} is below the minimum; using {MIN_INTERVAL_S:.0f} s",
              file=sys.stderr)
    user = getpass.getuser() if args.me else None
    states = tuple(s.strip() for item in args.state for s in item.split(",") if s.strip())
    watch = Watch(args.run_root or default_run_root(), args.interval, user=user, me=getpass.getuser(),
                  recent_h=args.since_hours)
    console = Console()
    if not (args.once or args.json) and sys.stdout.isatty() and sys.stdin.isatty():
        from hpcqwen.monitor_live import LiveQueue

        return LiveQueue(watch, console, args.name, states, user or "").run()
    snap = watch.refresh()
    rows = filter_rows(snap.rows, args.name, states, user or "")
    now = time.time()
    if args.json:
        print(json.dumps(to_json(rows, snap.status, now), indent=2))
    else:
        console.print(render_table(rows, now, console.size.width, status=snap.status, interval_s=watch.interval_s))
    return EXIT_SLURM if snap.status.error else EXIT_OK
