"""`hpcqwen sweep report`: one row per task of a sweep (or any array run), from Slurm and the run dir.

Columns: the task index, the swept values (the spec's `sweep:` knobs, else every key of the task's
`array.tasks` overrides), the state (Slurm's, refined by the run dir as `hpcqwen status` does), the
final and best train loss, the final and best eval loss, the final and best GRPO reward, tokens per
second over the whole run (tokens seen / training seconds) and the task's GPU-hours (hpcqwen.cost).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from hpcqwen import cost, runs, slurm
from hpcqwen.errors import RunDirError
from hpcqwen.metrics import read_metrics
from hpcqwen.paths import RunPaths
from hpcqwen.spec import JobSpec, read_frozen_spec
from hpcqwen.sweep import sweep_of

METRICS = ("loss", "best_loss", "eval_loss", "best_eval_loss", "reward", "best_reward", "tokens_per_s", "gpu_hours")
LOWER_IS_BETTER = {"loss", "best_loss", "eval_loss", "best_eval_loss", "gpu_hours"}


def swept_keys(spec: JobSpec) -> list[str]:
    """The knobs a sweep varied (or every key the array's per-task overrides set)."""
    sweep = sweep_of(spec)
    if sweep is not None:
        return sweep.knobs()
    keys: list[str] = []
    for overrides in spec.array.tasks if spec.array else []:
        keys += [str(k) for k in overrides if str(k) not in keys]
    return keys


def _numbers(records: list[dict[str, Any]], key: str, phase: str | None = None) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
            and (phase is None or r.get("phase") == phase)]


def task_metrics(task_dir: Path) -> dict[str, float | None]:
    """Final and best losses and reward, and tokens/s, of one task's metrics.jsonl."""
    records = read_metrics(task_dir / "metrics.jsonl")
    loss, evals = _numbers(records, "loss", "train"), _numbers(records, "eval_loss")
    reward = _numbers(records, "reward_mean")
    tokens, seconds = _numbers(records, "tokens_seen"), _numbers(records, "train_time_s")
    return {"loss": loss[-1] if loss else None, "best_loss": min(loss) if loss else None,
            "eval_loss": evals[-1] if evals else None, "best_eval_loss": min(evals) if evals else None,
            "reward": reward[-1] if reward else None, "best_reward": max(reward) if reward else None,
            "tokens_per_s": round(max(tokens) / max(seconds), 1) if tokens and seconds and max(seconds) > 0 else None}


def report_rows(run_dir: Path, run: slurm.RunCmd = slurm.run_cmd) -> tuple[list[str], list[dict[str, Any]]]:
    """(swept keys, one row per task)."""
    paths = RunPaths(run_dir)
    spec = read_frozen_spec(paths.spec_json)
    if spec.array is None:
        raise RunDirError(f"{run_dir} is not an array or sweep run", hint="give the run dir of a spec with sweep:")
    states = {r.array_task_id: r.slurm_state for r in runs.job_rows(runs.resolve_target(str(run_dir), run), run)}
    costs = cost.run_cost(run_dir, run)["tasks"]
    keys, rows = swept_keys(spec), []
    for i in range(spec.array.count):
        task = spec.task_for(i).model_dump(mode="json")
        values = {k: _dotted(task, k) for k in keys}
        rows.append({"task": i, **values, "state": states.get(i, "UNKNOWN"), **task_metrics(paths.task(i).dir),
                     "gpu_hours": costs.get(str(i), {}).get("allocated_gpu_hours")})
    return keys, rows


def _dotted(data: dict[str, Any], key: str) -> Any:
    value: Any = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def sort_rows(rows: list[dict[str, Any]], metric: str | None) -> list[dict[str, Any]]:
    """Best first by `metric` (lower for losses and GPU-hours, higher otherwise); tasks without it last."""
    if not metric:
        return rows
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(rows, key=lambda r: (r.get(metric) is None, sign * (r.get(metric) or 0), r["task"]))


def to_csv(keys: list[str], rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (a header line first)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, ["task", *keys, "state", *METRICS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table_lines(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """An aligned text table."""
    cols = ["task", *keys, "state", *METRICS]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return [" ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))] + [
        " ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
