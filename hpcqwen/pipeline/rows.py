"""The queue monitor's view of pipelines and GPU-hours: one row per pipeline, expandable into its stages.

`fetch_rows` (hpcqwen.monitor) builds one RunRow per run dir, stages included (their jobs run with
`--chdir=<pipeline dir>/stages/<stage>`); `group_pipelines` folds the rows of one pipeline's stages
into one row whose tasks are the stages (labelled by name, each with what it waits for), and
`with_gpu_hours` fills the GPU·H column: the `cost.json` a task wrote when its job ended, else
elapsed × GPUs for what still runs. Nothing here raises on odd files: a monitor shows what it knows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpcqwen import fs
from hpcqwen.errors import HpcqwenError
from hpcqwen.paths import COST
from hpcqwen.pipeline.record import RECORD, PipelineRecord, pipeline_dir_of, read_record
from hpcqwen.progress import recent_run_dirs
from hpcqwen.queue_rows import RunRow, TaskRow, array_state
from hpcqwen.slurm import SLURM_STATES, JobState


def recent_stage_dirs(run_root: Path | None, since: float) -> list[Path]:
    """The stage run dirs of pipelines submitted after `since` (their jobs may have left the queue)."""
    out: list[Path] = []
    for pdir in recent_run_dirs(run_root, since, marker=RECORD):
        try:
            out += [Path(st.run_dir) for st in read_record(pdir).stages.values()]
        except HpcqwenError:
            continue
    return out


def _gpu_hours(run_dir: str | None, row: RunRow | TaskRow, nodes: int, gpus: int, task: int | None) -> float | None:
    if run_dir is None:
        return None
    folder = Path(run_dir) if task is None else Path(run_dir) / "tasks" / str(task)
    data = fs.read_json(folder / COST)
    live = SLURM_STATES.get(row.slurm_state) == JobState.RUNNING
    if isinstance(data, dict) and not live and isinstance(data.get("allocated_gpu_hours"), (int, float)):
        return float(data["allocated_gpu_hours"])
    return (row.elapsed_s or 0.0) * max(nodes, 1) * gpus / 3600 if row.elapsed_s is not None and gpus else None


def with_gpu_hours(row: RunRow) -> RunRow:
    """The row (and its array tasks) with GPU·H filled in."""
    if not row.tasks:
        return dataclasses.replace(row, gpu_hours=_gpu_hours(row.run_dir, row, row.nodes, row.gpus_per_node, None))
    tasks = tuple(dataclasses.replace(t, gpu_hours=_gpu_hours(row.run_dir, t, row.nodes, row.gpus_per_node,
                                                              t.task_id)) for t in row.tasks)
    known = [t.gpu_hours for t in tasks if t.gpu_hours is not None]
    return dataclasses.replace(row, tasks=tasks, gpu_hours=sum(known) if known else None)


def group_pipelines(rows: list[RunRow]) -> list[RunRow]:
    """Rows with each pipeline's stage rows folded into one row (GPU·H filled in everywhere)."""
    rows = [with_gpu_hours(r) for r in rows]
    groups: dict[Path, list[RunRow]] = {}
    out = []
    for r in rows:
        pdir = pipeline_dir_of(Path(r.run_dir)) if r.run_dir else None
        if pdir is None:
            out.append(r)
        else:
            groups.setdefault(pdir, []).append(r)
    for pdir, stage_rows in groups.items():
        try:
            out.append(pipeline_row(pdir, read_record(pdir), stage_rows))
        except HpcqwenError:
            out += stage_rows
    return out


def pipeline_row(pdir: Path, record: PipelineRecord, stage_rows: list[RunRow]) -> RunRow:
    """One row for a pipeline: its stages as tasks, the state that matters most, the stage it is blocked on."""
    by_dir = {r.run_dir: r for r in stage_rows}
    tasks, states = [], {}
    for i, (name, st) in enumerate(record.stages.items()):
        r = by_dir.get(st.run_dir)
        state = r.slurm_state if r else ("NOT SUBMITTED" if not st.job_ids else "UNKNOWN")
        states[name] = state
        tasks.append(TaskRow(i, r.job_id if r else ",".join(st.job_ids[-1:]), state, _waits(st.after, states, r),
                             r.elapsed_s if r else None, r.progress if r else None,
                             r.checkpoint_step if r else None, r.checkpoint_at if r else None,
                             r.restarts if r else 0, label=name, gpu_hours=r.gpu_hours if r else None))
    state = array_state([t.slurm_state for t in tasks])
    active = next((r for r in stage_rows if r.slurm_state == "RUNNING"), None)
    known = [t.gpu_hours for t in tasks if t.gpu_hours is not None]
    blocked = next((f"{t.label}: {t.reason}" for t in tasks if t.reason.startswith("never runs")), "")
    running = [t.label for t in tasks if t.slurm_state == "RUNNING"]
    note = blocked or (f"running {', '.join(running)}" if running else "")
    first = next((r for r in stage_rows if r.job_id), None)
    head = next((st.job_ids[0] for st in record.stages.values() if st.job_ids), None)
    return RunRow(record.name, f"{head}…" if head else pdir.name, str(pdir), state,
                  note=note, user=record.user, nodes=active.nodes if active else 0,
                  gpus_per_node=active.gpus_per_node if active else 0, elapsed_s=active.elapsed_s if active else None,
                  elapsed_at=active.elapsed_at if active else None, tasks=tuple(tasks), array_size=len(tasks),
                  gpu_hours=sum(known) if known else None, source=first.source if first else "none",
                  submitted_at=min((r.submitted_at for r in stage_rows if r.submitted_at), default=None))


def _waits(after: list[list[str]], states: dict[str, str], row: RunRow | None) -> str:
    """What a stage waits for (its producers' states), or the pending reason Slurm gives."""
    if row is not None and SLURM_STATES.get(row.slurm_state) != JobState.PENDING:
        return row.reason
    for kind, other in after:
        state = states.get(other, "UNKNOWN")
        if SLURM_STATES.get(state) in (JobState.RUNNING, JobState.PENDING):
            return f"waits for {other}"
        if kind == "afterok" and state != "COMPLETED":
            return f"never runs: {other} {state}"
    return row.reason if row else ""

