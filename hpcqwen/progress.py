"""What a run dir says about training progress, read cheaply enough to do every few seconds.

`read_progress` summarises the tail of a metrics.jsonl (the format of hpcqwen.metrics),
`restarts_of` the launchers' launches.jsonl files, `checkpoint_of` the newest complete checkpoint,
`refine_state` turns Slurm's FAILED into STOPPED when the batch script ended a saved, resumable
run without requeue (the task's FINAL file), FAILED or CANCELLED into HUNG when the hang watchdog
ended it (FINAL again), `ending_of` says how a task ended when Slurm no longer knows its job (FINAL,
else OUTCOME). File reads are memoized on the file's (mtime, size), so an unchanged file costs one
stat (cheap on NFS); `checkpoint_of` is not memoized (a marker written inside a checkpoint folder does
not change the folder above it): one listing of `checkpoints/` and a stat per candidate each call.
Unreadable or half-written files give "nothing known", never an exception.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from hpcqwen.checkpoints import MARKER, latest_complete, step_of
from hpcqwen.metrics import tail_metrics
from hpcqwen.paths import FINAL, MANIFEST, OUTCOME, RunPaths, is_run_dir

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """What the tail of one metrics.jsonl says (None where the runner did not log it)."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    losses: tuple[float, ...] = ()  # recent losses, oldest first (the sparkline)
    lr: float | None = None
    tokens_per_s: float | None = None
    reward_mean: float | None = None  # GRPO
    done: int | None = None  # distill: samples done / total, shards written
    total: int | None = None
    shards_done: int | None = None
    phase: str = ""
    updated_at: float | None = None  # `time` of the newest line
    steps_per_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds to `total_steps` at the recent step rate."""
        if self.step is None or not self.total_steps or not self.steps_per_s:
            return None
        return max(0.0, (self.total_steps - self.step) / self.steps_per_s)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_STAT_MEMO: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}


def _by_stat(kind: str, path: Path, read: Callable[[Path], T], default: T) -> T:
    """read(path), re-read only when the file's mtime or size changed (cheap on NFS)."""
    try:
        st = path.stat()
    except OSError:
        return default
    key, sig = (kind, str(path)), (st.st_mtime_ns, st.st_size)
    hit = _STAT_MEMO.get(key)
    if hit and hit[0] == sig:
        return hit[1]  # type: ignore[no-any-return]
    if len(_STAT_MEMO) > 50_000:
        _STAT_MEMO.clear()
    try:
        value = read(path)
    except (OSError, ValueError):
        value = default
    _STAT_MEMO[key] = (sig, value)
    return value


@lru_cache(maxsize=65536)
def is_run_dir_cached(work_dir: str) -> bool:
    # Memoized for good: a job's run dir exists before sbatch is called, so a work dir that is
    # not a run dir while its job is queued never becomes one.
    return is_run_dir(work_dir)


def manifest_of(run_dir: Path) -> dict[str, Any]:
    data: Any = _by_stat("manifest", run_dir / MANIFEST, lambda p: json.loads(p.read_text(encoding="utf-8")), {})
    return data if isinstance(data, dict) else {}


def recent_run_dirs(run_root: Path | None, since: float, marker: str = MANIFEST) -> list[Path]:
    """Run dirs `<run_root>/<name>/<UTC stamp>-<hash>` submitted after `since` (from the name); with
    `marker` pipeline.json, pipeline dirs."""
    if run_root is None or not run_root.is_dir():
        return []
    cutoff = dt.datetime.fromtimestamp(since, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    found = []
    for name_dir in _subdirs(run_root):
        found += [d for d in _subdirs(name_dir) if d.name[:16] >= cutoff and (d / marker).is_file()]
    return found


def _subdirs(path: Path) -> list[Path]:
    def scan(p: Path) -> list[Path]:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    return _by_stat("subdirs", path, scan, [])


def read_progress(path: Path) -> Progress | None:
    """Progress from the last lines of a metrics.jsonl (None when there is none)."""
    return _by_stat("metrics", path, _progress_of, None)


def _progress_of(path: Path) -> Progress | None:
    recs = tail_metrics(path, n=64)
    if not recs:
        return None

    def latest(key: str) -> float | None:
        return next((v for r in reversed(recs) if (v := _number(r.get(key))) is not None), None)
    # Step rate over the records since the last restart (a requeue resets the clock).
    timed = [(_number(r.get("step")), _number(r.get("time"))) for r in recs]
    pts = [(s, t) for s, t in timed if s is not None and t is not None]
    for i in range(len(pts) - 1, 0, -1):
        if pts[i][0] < pts[i - 1][0] or pts[i][1] - pts[i - 1][1] > 600:
            pts = pts[i:]
            break
    (s0, t0), (s1, t1) = (pts[max(0, len(pts) - 20)], pts[-1]) if pts else ((0.0, 0.0), (0.0, 0.0))
    step, total = latest("step"), latest("total_steps")
    done, dtotal, shards = latest("done"), latest("total"), latest("shards_done")
    return Progress(
        step=int(step) if step is not None else None, total_steps=int(total) if total else None,
        loss=latest("loss"), losses=tuple(v for r in recs if (v := _number(r.get("loss"))) is not None)[-24:],
        lr=latest("lr"), tokens_per_s=latest("tokens_per_s"), reward_mean=latest("reward_mean"),
        done=int(done) if done is not None else None, total=int(dtotal) if dtotal is not None else None,
        shards_done=int(shards) if shards is not None else None, phase=str(recs[-1].get("phase") or ""),
        updated_at=latest("time"), steps_per_s=(s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None)


def _max_restarts(p: Path) -> int:
    """Restarts of one task: its starts after the first (a `hpcqwen resume` is a new job whose
    SLURM_RESTART_COUNT starts at 0 again, so the count of starts is what continues)."""
    n, starts = 0, 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            n = max(n, int(json.loads(line).get("restart_count") or 0))
        except (ValueError, TypeError, AttributeError):
            continue
        starts += 1
    return max(n, starts - 1)


def restarts_of(run_dir: Path, array_size: int | None = None) -> dict[int | None, int]:
    """Restarts per task (None for a plain job), from each task's launches.jsonl."""
    paths = RunPaths(run_dir)
    indices: list[int | None] = list(range(array_size)) if array_size else [None]
    return {i: _by_stat("launches", paths.task(i).launches, _max_restarts, 0) for i in indices}


def final_of(task_dir: Path) -> str:
    """The task's FINAL line (`STOPPED <why>`), or ''."""
    return _by_stat("final", task_dir / FINAL, lambda p: p.read_text(encoding="utf-8", errors="replace").strip(), "")


def ending_of(task_dir: Path) -> str:
    """What the task's files say about how it ended: its FINAL line, else its OUTCOME line (`done ...`),
    else '' (for a job Slurm has forgotten, this is all that is left)."""
    def first_line(p: Path) -> str:
        lines = p.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[0][:200] if lines else ""
    return final_of(task_dir)[:200] or _by_stat("outcome", task_dir / OUTCOME, first_line, "")


def refine_state(slurm_state: str, task_dir: Path | None) -> str:
    """Slurm's state, except FAILED -> STOPPED when the batch script ended a resumable run that
    saved a complete checkpoint but was not requeued (restart limit, requeue refused or off):
    Slurm says FAILED (exit 75), the work says STOPPED. CANCELLED stays CANCELLED."""
    if slurm_state == "FAILED" and task_dir is not None and final_of(task_dir).startswith("STOPPED"):
        return "STOPPED"
    if slurm_state in ("FAILED", "CANCELLED") and task_dir is not None and final_of(task_dir).startswith("HUNG"):
        return "HUNG"  # the hang watchdog ended it (hangaction.py): not a crash, not a user's cancel
    return slurm_state


def checkpoint_of(task_dir: Path) -> tuple[int | None, float | None]:
    try:
        ckpt = latest_complete(task_dir / "checkpoints")
        return (step_of(ckpt), (ckpt / MARKER).stat().st_mtime) if ckpt else (None, None)
    except OSError:
        return None, None
