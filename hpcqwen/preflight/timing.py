"""Checks run on submit that read files outside the spec (the spec models stay pure).

`signal_lead_problems`: the time-limit signal must leave time for one more step plus one save
(`requeue.signal_lead_s`). The numbers come from the newest earlier run of the same spec name under
the run root, as measured there: seconds per optimizer step (metrics.jsonl `time` between train
lines), seconds per checkpoint save (`save_s` in the checkpoints' completion markers), seconds per
distillation batch (`batch_s`). Without an earlier run there is nothing measured, and the
documented fallback is the save alone, estimated from the model folder's weight files at
`ASSUMED_FS_BYTES_PER_S` (LoRA saves only adapters; a full save writes weights and Adam states,
about 3× the bf16 weights again): that estimate only warns.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from hpcqwen.checkpoints import MARKER
from hpcqwen.metrics import read_metrics
from hpcqwen.spec import JobSpec

ASSUMED_FS_BYTES_PER_S = 1e9  # a shared filesystem's write rate for one job, when nothing was measured
MARGIN_S = 10.0  # the signal may come late by this much, and a rank may be mid-step
MAX_RUN_DIRS = 20  # earlier run dirs looked at (newest first)


@dataclass(frozen=True)
class Timing:
    """What an earlier run measured."""

    run_dir: Path
    step_s: float  # median seconds per step (or per distillation batch)
    save_s: float  # the slowest save

    @property
    def needed_s(self) -> float:
        """One step, one save and the margin."""
        return self.step_s + self.save_s + MARGIN_S


def _step_seconds(records: list[dict[str, object]]) -> list[float]:
    batches = [float(b) for r in records if isinstance(b := r.get("batch_s"), (int, float))]
    if batches:
        return batches
    train: list[tuple[float, float]] = []
    for r in records:
        step, t = r.get("step"), r.get("time")
        if r.get("phase") == "train" and "loss" in r and isinstance(step, (int, float)) and isinstance(t, (int, float)):
            train.append((float(step), float(t)))
    out = []
    for (s0, t0), (s1, t1) in zip(train, train[1:], strict=False):
        if s1 > s0 and 0 < t1 - t0 < 3600:  # not across a restart
            out.append((t1 - t0) / (s1 - s0))
    return out


def _save_seconds(run_dir: Path) -> list[float]:
    out = []
    for marker in [*run_dir.glob(f"checkpoints/*/{MARKER}"), *run_dir.glob(f"tasks/*/checkpoints/*/{MARKER}")]:
        try:
            value = json.loads(marker.read_text(encoding="utf-8")).get("save_s")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            out.append(float(value))
    return out


def measured_timing(run_root: Path, name: str) -> Timing | None:
    """Step and save seconds of the newest earlier run of `name` that measured both."""
    folder = run_root / name
    if not folder.is_dir():
        return None
    runs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), reverse=True)
    for run_dir in runs[:MAX_RUN_DIRS]:
        metrics = [run_dir / "metrics.jsonl", *sorted(run_dir.glob("tasks/*/metrics.jsonl"))]
        steps = [s for m in metrics for s in _step_seconds(read_metrics(m))]
        saves = _save_seconds(run_dir)
        if steps and (saves or any(r.get("batch_s") for m in metrics for r in read_metrics(m))):
            return Timing(run_dir, statistics.median(steps), max(saves, default=0.0))
    return None


def estimated_save_s(spec: JobSpec) -> float | None:
    """The documented fallback: the model folder's weights over ASSUMED_FS_BYTES_PER_S."""
    model = getattr(spec.task, "model", None)
    if not isinstance(model, str) or not Path(model).is_dir():
        return None
    size = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    if not size:
        return None
    if getattr(spec.task, "train_type", "full") == "lora":
        return 0.0
    return 4 * size / ASSUMED_FS_BYTES_PER_S  # weights + fp32 Adam states (about 3× bf16 weights)


def signal_lead_problems(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(errors, warnings) about `requeue.signal_lead_s`, with the numbers."""
    if not spec.requeue.enabled:
        return [], []
    lead = spec.requeue.signal_lead_s
    timing = measured_timing(Path(spec.cluster.run_root), spec.name)
    if timing is not None and lead < timing.needed_s:
        return [f"requeue.signal_lead_s ({lead} s) is shorter than one step ({timing.step_s:.0f} s) plus one save "
                f"({timing.save_s:.0f} s) plus {MARGIN_S:.0f} s, as measured in {timing.run_dir}: the run would be "
                f"killed before its last save (set requeue.signal_lead_s >= {int(timing.needed_s) + 1})"], []
    estimate = estimated_save_s(spec) if timing is None else None
    if estimate is not None and lead < estimate + MARGIN_S:
        return [], [f"requeue.signal_lead_s ({lead} s) may not cover one save: about {estimate:.0f} s for the "
                    f"weights and optimizer states at {ASSUMED_FS_BYTES_PER_S / 1e9:g} GB/s (no earlier run of "
                    f"'{spec.name}' measured it); consider signal_lead_s >= {int(estimate + MARGIN_S) + 1}"]
    return [], []
