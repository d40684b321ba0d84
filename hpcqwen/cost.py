"""GPU-hours of a run, and where they went: start-up, steps kept, steps lost, saving, other.

Allocated GPU-hours come from accounting: `sacct --duplicates` lists every incarnation of every job
(a requeued job once per start, the earlier ones REQUEUED) with its Start, End and AllocTRES
(`gres/gpu=N`, all nodes); a running incarnation ends "now". The run dir says what each incarnation
did with them, per task:
- **startup**: Start to the training loop's first line (`metrics.jsonl`'s train-begin record; a
  distill batch's start, its line's time less `batch_s`; else the first metrics line); the whole
  incarnation when it never got there (a `command` task that logs no metrics is all start-up);
- **saving**: the saves completed in the incarnation (`checkpoints/saves.jsonl`, `save_s` each);
- **steps_kept**: from the first step to the last save (a requeued incarnation) or to the last
  metrics line (the last incarnation), less the saving;
- **steps_lost**: an incarnation that was requeued, from its last save to its end: steps redone by
  the next one (and the exit);
- **other**: the last incarnation's time after its last step (exit, or a step in progress).
The five add up to the allocation by construction. Tokens come from the newest `tokens_seen`.
Without accounting (the local backend, or sacct disabled) incarnations come from `launches.jsonl`
(from one start to the next, the last to its last metrics line) and the source says so.
`cost.json` is written by each task's node 0 at the end of every job (`write_task_cost`: sacct is
not final while the job runs, so it holds what is known then) and recomputed by `hpcqwen cost`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcqwen import arrays, fs, slurm
from hpcqwen.errors import HpcqwenError
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.metrics import read_metrics
from hpcqwen.paths import COST, SAVES, RunPaths

CATEGORIES = ("startup", "steps_kept", "steps_lost", "saving", "other")
SACCT_COST_FIELDS = ["JobID", "JobIDRaw", "State", "Start", "End", "AllocTRES", "NNodes"]


@dataclass(frozen=True)
class Incarnation:
    """One start of one task: from Slurm's Start to its End (None while it runs)."""

    job_id: str
    task: int | None
    state: str
    start: float
    end: float | None
    gpus: int


@dataclass
class Breakdown:
    """GPU-seconds by category (and wall seconds), tokens, incarnations."""

    gpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    wall_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    tokens: int = 0
    incarnations: int = 0

    def add(self, other: Breakdown) -> None:
        """Sum another task's (or stage's) figures into this one."""
        for k in CATEGORIES:
            self.gpu_s[k] += other.gpu_s[k]
            self.wall_s[k] += other.wall_s[k]
        self.tokens += other.tokens
        self.incarnations += other.incarnations

    @property
    def allocated_gpu_h(self) -> float:
        """GPU-hours allocated (the sum of the categories)."""
        return sum(self.gpu_s.values()) / 3600

    def as_json(self) -> dict[str, Any]:
        """GPU-hours per category, the totals, tokens per GPU-hour."""
        gpu_h = self.allocated_gpu_h
        return {"gpu_hours": {k: round(v / 3600, 6) for k, v in self.gpu_s.items()},
                "wall_hours": {k: round(v / 3600, 6) for k, v in self.wall_s.items()},
                "allocated_gpu_hours": round(gpu_h, 6),
                "allocated_wall_hours": round(sum(self.wall_s.values()) / 3600, 6),
                "tokens": self.tokens, "tokens_per_gpu_hour": round(self.tokens / gpu_h, 1) if gpu_h else None,
                "incarnations": self.incarnations}


# ---- accounting ---------------------------------------------------------------------------------

def _epoch(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None  # Unknown, None


def gpus_of_tres(tres: str) -> int:
    """`billing=8,cpu=8,gres/gpu=4,node=2` -> 4 (typed counts `gres/gpu:h100=4` included once)."""
    m = re.search(r"gres/gpu=(\d+)", tres)
    return int(m.group(1)) if m else 0


def parse_incarnations(text: str, offsets: dict[str, int]) -> list[Incarnation]:
    """Rows of `sacct --duplicates -X --parsable2 --format=<SACCT_COST_FIELDS>`; pending ones are left out."""
    out = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_COST_FIELDS):
            continue
        jid, _raw, state, start, end, tres, _nodes = parts
        array_job, _, task = jid.partition("_")
        begun = _epoch(start)
        if begun is None or (task and not task.isdigit()):
            continue  # never started, or a pending range such as 12_[3-5]
        index = int(task) + offsets.get(array_job, 0) if task else None
        out.append(Incarnation(jid, index, state.split()[0] if state.strip() else "UNKNOWN", begun, _epoch(end),
                               gpus_of_tres(tres)))
    return out


def sacct_incarnations(job_ids: list[str], offsets: dict[str, int],
                       run: slurm.RunCmd = slurm.run_cmd) -> list[Incarnation] | None:
    """Every incarnation of the jobs (requeues included), or None when accounting is unavailable."""
    ids = [j for j in job_ids if JOB_ID_RE.fullmatch(j)]
    if not ids:
        return None
    argv = ["sacct", "--duplicates", "--noheader", "--parsable2", "-X", f"--format={','.join(SACCT_COST_FIELDS)}",
            f"--jobs={','.join(ids)}"]
    try:
        proc = run(argv, 30.0)
    except HpcqwenError:
        return None
    if proc.returncode != 0:
        return None
    return parse_incarnations(proc.stdout, offsets)


# ---- the run dir --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskLog:
    """What one task's files say, as times."""

    begins: list[float]  # train-begin records (one per start of the training loop)
    lines: list[float]  # every metrics line
    saves: list[tuple[float, float]]  # (completed at, seconds)
    launches: list[float]
    tokens: int


def read_task_log(task_dir: Path) -> TaskLog:
    """Times from metrics.jsonl, checkpoints/saves.jsonl and launches.jsonl (unreadable lines skipped)."""
    records = read_metrics(task_dir / "metrics.jsonl")
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))]
    begins = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))
              and r.get("phase") == "train" and "loss" not in r and "eval_loss" not in r]
    # A distill line closes a batch of `batch_s` seconds: the batch began that long before it.
    begins += [float(r["time"]) - float(r["batch_s"]) for r in records
               if isinstance(r.get("time"), (int, float)) and isinstance(r.get("batch_s"), (int, float))]
    tokens = max((int(r["tokens_seen"]) for r in records if isinstance(r.get("tokens_seen"), (int, float))), default=0)
    saves = [(float(s["time"]), float(s.get("save_s") or 0)) for s in read_metrics(task_dir / "checkpoints" / SAVES)
             if isinstance(s.get("time"), (int, float))]
    launches = [t for x in read_metrics(task_dir / "launches.jsonl")
                if (t := _epoch(str(x.get("time", "")))) is not None]
    return TaskLog(sorted(begins), sorted(times), sorted(saves), sorted(launches), tokens)


def split_incarnation(a: float, b: float, log: TaskLog, final: bool) -> dict[str, float]:
    """Wall seconds of [a, b] by category (they add up to b - a)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    begin = next((t for t in log.begins if a <= t <= b), None) or next((t for t in log.lines if a <= t <= b), None)
    if begin is None:
        out["startup"] = b - a
        return out
    saves = [(t, s) for t, s in log.saves if begin <= t <= b]
    last_save = max((t for t, _ in saves), default=None)
    if final:
        end = max([begin, *(t for t in log.lines if begin <= t <= b), *(t for t, _ in saves)])
    else:
        end = last_save or begin
    saving = min(sum(s for _, s in saves), end - begin)
    out["startup"], out["saving"] = begin - a, saving
    out["steps_kept"] = end - begin - saving
    out["other" if final else "steps_lost"] = b - end
    return out


def task_breakdown(incarnations: list[Incarnation], log: TaskLog, now: float) -> Breakdown:
    """One task's GPU-seconds by category over its incarnations (oldest first)."""
    br = Breakdown(tokens=log.tokens, incarnations=len(incarnations))
    ordered = sorted(incarnations, key=lambda i: i.start)
    for k, inc in enumerate(ordered):
        end = inc.end if inc.end is not None else now
        for cat, secs in split_incarnation(inc.start, max(end, inc.start), log, k == len(ordered) - 1).items():
            br.wall_s[cat] += secs
            br.gpu_s[cat] += secs * inc.gpus
    return br


def launches_as_incarnations(log: TaskLog, gpus: int, now: float) -> list[Incarnation]:
    """Without accounting: each start (launches.jsonl) up to the next, the last to its last metrics line."""
    out = []
    for k, start in enumerate(log.launches):
        last = max([start, *log.lines, *(t for t, _ in log.saves)])
        end = log.launches[k + 1] if k + 1 < len(log.launches) else last
        out.append(Incarnation("local", None, "UNKNOWN", start, min(end, now), gpus))
    return out


# ---- a run, a pipeline ----------------------------------------------------------------------------

def run_cost(run_dir: Path, run: slurm.RunCmd = slurm.run_cmd, now: float | None = None,
             only_task: int | None = None, job_ids: list[str] | None = None) -> dict[str, Any]:
    """The cost of a run dir (every task, or `only_task`; from the manifest's jobs, or `job_ids`): per task
    and in total, as cost.json holds it."""
    from hpcqwen.rundir import read_manifest
    from hpcqwen.spec import read_frozen_spec

    now = time.time() if now is None else now
    paths = RunPaths(run_dir)
    spec, info = read_frozen_spec(paths.spec_json), read_manifest(run_dir)
    tasks: list[int | None] = list(range(spec.array.count)) if spec.array else [None]
    if only_task is not None:
        tasks = [only_task]
    offsets = arrays.offsets_of(info)
    incs = sacct_incarnations(job_ids or [str(j) for j in info.get("job_ids") or []], offsets, run)
    total, per_task = Breakdown(), {}
    for t in tasks:
        log = read_task_log(paths.task(t).dir)
        mine = [i for i in incs if i.task == t] if incs is not None else \
            launches_as_incarnations(log, spec.gpus_per_node * spec.resources.nodes, now)
        br = task_breakdown(mine, log, now)
        per_task["-" if t is None else str(t)] = br.as_json()
        total.add(br)
    ended = incs is not None and all(i.end is not None for i in incs)
    return {"run_dir": str(run_dir), "computed_at": round(now, 3), "source": "sacct --duplicates" if incs is not None
            else "launches.jsonl (no accounting)", "final": ended, "gpus_per_node": spec.gpus_per_node,
            "nodes": spec.resources.nodes, **total.as_json(), "tasks": per_task}


def write_run_cost(run_dir: Path, run: slurm.RunCmd = slurm.run_cmd) -> dict[str, Any]:
    """Compute and write RUN_DIR/cost.json; returns it."""
    data = run_cost(run_dir, run)
    fs.write_json_atomic(Path(run_dir) / COST, data)
    return data


def write_task_cost(run_dir: Path, task_dir: Path, array_index: int | None) -> None:
    """At the end of a job (node 0): TASK_DIR/cost.json with what is known now; never raises. An array task
    asks sacct about itself only (SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID): a thousand tasks ending must
    not each ask for the whole array; `hpcqwen cost` adds earlier submissions."""
    env = os.environ
    mine = [f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"] if array_index is not None and \
        env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else None
    try:
        data = run_cost(run_dir, only_task=array_index, job_ids=mine)
        fs.write_json_atomic(task_dir / COST, data)
    except Exception as e:  # noqa: BLE001 - accounting must never fail the job
        print(f"hpcqwen: cost.json not written: {type(e).__name__}: {e}", flush=True)


def sum_costs(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals of several cost.json objects (a pipeline's stages)."""
    total = Breakdown()
    for data in parts.values():
        br = Breakdown(tokens=int(data.get("tokens") or 0), incarnations=int(data.get("incarnations") or 0))
        br.gpu_s = {k: float(data["gpu_hours"][k]) * 3600 for k in CATEGORIES}
        br.wall_s = {k: float(data["wall_hours"][k]) * 3600 for k in CATEGORIES}
        total.add(br)
    return total.as_json()


def cost_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A text table: one line per row (task or stage), GPU-hours by category, tokens per GPU-hour."""
    head = f"{'':<14} {'alloc GPU-h':>11} " + " ".join(f"{c:>10}" for c in CATEGORIES) + f" {'tok/GPU-h':>10}"
    out = [head]
    for name, d in rows.items():
        tph = d.get("tokens_per_gpu_hour")
        out.append(f"{name[:14]:<14} {d['allocated_gpu_hours']:>11.4f} "
                   + " ".join(f"{d['gpu_hours'][c]:>10.4f}" for c in CATEGORIES)
                   + f" {'' if tph is None else f'{tph:,.0f}':>10}")
    return out
