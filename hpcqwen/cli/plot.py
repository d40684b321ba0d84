"""`hpcqwen plot RUN_DIR`: loss, lr, tokens/s (and GRPO reward) curves from metrics.jsonl as a PNG.

An array's tasks share one figure, one line per task. matplotlib is an optional dependency
(`pip install 'hpcqwen[plot]'`); it is imported only here, with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpcqwen.errors import HpcqwenError, RunDirError
from hpcqwen.metrics import read_metrics
from hpcqwen.paths import RunPaths, is_run_dir

PANELS = [("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("reward_mean", "reward mean")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR [--output PNG]."""
    p.add_argument("run_dir", type=Path, help="run dir that `hpcqwen submit` printed")
    p.add_argument("--output", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")


def metric_series(run_dir: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, records) of the run, or of each array task (tasks/<i>/), that has metrics."""
    paths = RunPaths(run_dir)
    series = [("run", read_metrics(paths.task(None).metrics))]
    tasks = paths.root / "tasks"
    if tasks.is_dir():
        idx = sorted(int(d.name) for d in tasks.iterdir() if d.name.isdigit())
        series += [(f"task {i}", read_metrics(paths.task(i).metrics)) for i in idx]
    return [(label, recs) for label, recs in series if any("step" in r for r in recs)]


def plot_series(series: list[tuple[str, list[dict[str, Any]]]], out: Path, title: str) -> list[str]:
    """Draw one panel per metric that any series has; return the panels' keys."""
    try:
        import matplotlib
    except ImportError:
        raise HpcqwenError("matplotlib is not installed", hint="pip install 'hpcqwen[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(recs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]
    panels = [(k, t) for k, t in PANELS if any(points(recs, k)[0] for _, recs in series)]
    if not panels:
        raise RunDirError("metrics.jsonl has no loss, lr, tokens_per_s or reward_mean values to plot")
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(8, 2.2 * len(panels) + 0.6), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels, strict=True):
        for name, recs in series:
            xs, ys = points(recs, key)
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if len(series) > 1:
        axes[0, 0].legend(fontsize="small", ncol=min(4, len(series)))
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [k for k, _ in panels]


def run(args: argparse.Namespace) -> int:
    """Write the PNG and print where it went."""
    run_dir = args.run_dir.expanduser().resolve()
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not an hpcqwen run dir (no spec.json)",
                          hint="give the run dir that `hpcqwen submit` printed")
    series = metric_series(run_dir)
    if not series:
        raise RunDirError(f"no metrics yet in {run_dir}", where=str(RunPaths(run_dir).task(None).metrics),
                          hint="the runner writes metrics.jsonl from its first logging step on")
    out = args.output or RunPaths(run_dir).plot
    keys = plot_series(series, out, f"{run_dir.parent.name}/{run_dir.name}")
    print(f"wrote {out} ({', '.join(keys)}; {len(series)} series)")
    return 0
