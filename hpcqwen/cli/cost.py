"""`hpcqwen cost RUN_DIR|PIPELINE_DIR [--json]`: GPU-hours allocated and where they went, from sacct and the run dir.

Recomputes and writes `cost.json` (a run's, or each stage's and the pipeline's total), then prints one
row per array task or stage and the total: allocated GPU-hours, start-up, steps kept, steps lost to
preemption or crashes, saving, other, and tokens per GPU-hour (hpcqwen.cost says how each is measured).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpcqwen import cost, fs
from hpcqwen.errors import EXIT_OK, RunDirError
from hpcqwen.paths import COST, is_run_dir
from hpcqwen.pipeline.record import is_pipeline_dir, read_record


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET [--json]."""
    p.add_argument("target", help="a run dir, or a pipeline dir")
    p.add_argument("--json", action="store_true", help="print cost.json instead of the table")


def pipeline_cost(pdir: Path) -> dict[str, Any]:
    """Each stage's cost (earlier run dirs of redone stages too), their total; written to PIPELINE_DIR/cost.json."""
    stages: dict[str, dict[str, Any]] = {}
    for name, st in read_record(pdir).stages.items():
        for k, run_dir in enumerate([*st.earlier_run_dirs, st.run_dir]):
            label = name if k == len(st.earlier_run_dirs) else f"{name} (run {k + 1})"
            if st.job_ids or k < len(st.earlier_run_dirs):
                stages[label] = cost.write_run_cost(Path(run_dir))
    data = {"pipeline_dir": str(pdir), **cost.sum_costs(stages), "stages": stages}
    fs.write_json_atomic(pdir / COST, data)
    return data


def run(args: argparse.Namespace) -> int:
    """Compute, write, print."""
    target = Path(args.target).expanduser().resolve()
    if is_pipeline_dir(target):
        data = pipeline_cost(target)
        rows = {**data["stages"], "total": data}
    elif is_run_dir(target):
        data = cost.write_run_cost(target)
        rows = {f"task {k}" if k != "-" else "run": v for k, v in data["tasks"].items()}
        if len(rows) > 1:
            rows["total"] = data
    else:
        raise RunDirError(f"{args.target} is neither a run dir nor a pipeline dir",
                          hint="give the dir that `hpcqwen submit` or `hpcqwen pipeline submit` printed")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"GPU-hours of {target} (sacct: {'final' if data.get('final', True) else 'jobs still running'})")
    print("\n".join(cost.cost_lines(rows)))
    return EXIT_OK
