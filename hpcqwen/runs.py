"""From what a user types (a job id or a run dir) to the run dir, its jobs, their states and logs
(`pick_log`, and `read_new`, which `hpcqwen logs -f` and the monitor's log view follow by byte offset).

Jobs run with `--chdir=RUN_DIR`, so squeue's %Z and sacct's WorkDir lead from a job id back
to its run dir; a run dir's manifest leads to its job ids.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcqwen import arrays, slurm
from hpcqwen.cluster import profile_run_roots
from hpcqwen.errors import JobFailed, RunDirError
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.paths import RunPaths, is_run_dir
from hpcqwen.progress import ending_of, refine_state
from hpcqwen.rundir import local_status, read_manifest


@dataclass(frozen=True)
class RunRef:
    """A run dir and/or a job, as far as they could be found."""

    run_dir: Path | None
    job_id: str  # the whole job (array id for arrays): the newest submission of the run dir
    backend: str  # slurm | submitit | local
    array_task: int | None = None  # set when the user named one task (123_4)
    array_size: int | None = None
    earlier_jobs: tuple[str, ...] = ()  # earlier submissions of the run dir (`hpcqwen resume` adds jobs)
    array_offsets: tuple[tuple[str, int], ...] = ()  # (job id, first task) of chunked arrays (hpcqwen.arrays)


LOCAL_ID_RE = re.compile(r"^local-(\d+)$")


def resolve_target(text: str, run: slurm.RunCmd = slurm.run_cmd) -> RunRef:
    """A run dir path, a job id (123, 123_4) or a local run's id (local-4242) -> RunRef."""
    path = Path(text).expanduser()
    if is_run_dir(path):
        info = read_manifest(path.resolve())
        jobs = info.get("job_ids") or []
        if not jobs:
            raise RunDirError(f"{path} was never submitted (its manifest lists no job id)",
                              hint="submit the spec again with `hpcqwen submit`")
        # the newest submission (`hpcqwen resume` appends one); a task it did not rerun is an earlier job's
        return RunRef(path.resolve(), str(jobs[-1]), info.get("backend", "slurm"), None, info.get("array_size"),
                      tuple(str(j) for j in jobs[:-1]), tuple(arrays.offsets_of(info).items()))
    if LOCAL_ID_RE.match(text):
        run_dir = _local_run_dir(text)
        if run_dir is None:
            raise RunDirError(f"no run dir of {text} was found (it is not running, and no run dir under the "
                              "local profile's run root names it)", hint="give the run dir that `hpcqwen submit` "
                              "printed")
        return resolve_target(str(run_dir), run)
    if JOB_ID_RE.fullmatch(text):
        job, _, task = text.partition("_")
        rows = slurm.query_jobs([job], run=run)[job]
        work = next((r.work_dir for r in rows if r.work_dir), "")
        run_dir = Path(work) if work and is_run_dir(work) else None
        if run_dir is None and not rows:  # forgotten by Slurm (past MinJobAge, no accounting)
            run_dir = find_run_dir(job)
        info = read_manifest(run_dir) if run_dir else {}
        backend = "slurm" if info.get("backend") in (None, "local") else str(info["backend"])
        return RunRef(run_dir, job, backend, int(task) if task else None, info.get("array_size"))
    raise RunDirError(f"{text!r} is neither a run dir nor a Slurm job id",
                      hint="give the run dir that `hpcqwen submit` printed, or a job id such as 123 or 123_4")


def _local_run_dir(job_id: str) -> Path | None:
    """The run dir of a local run: from its process's command line while it runs, else from the
    manifests under the profiles' run roots."""
    pid = job_id.removeprefix("local-")
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "hpcqwen.localrun" in args and is_run_dir(args[-1] or args[-2]):
            return Path(args[-1] or args[-2])
    except (OSError, IndexError):
        pass
    return find_run_dir(job_id)


MAX_SCANNED_RUNS = 5000  # newest run dirs per run root searched for a job id that Slurm forgot


def find_run_dir(job_id: str) -> Path | None:
    """The newest run dir, under the run root of any profile, whose manifest lists `job_id`
    (`<run_root>/<name>/<UTC stamp>-<hash>/manifest.json`); None when none does."""
    for root in profile_run_roots():
        manifests = sorted(root.glob("*/*/manifest.json"), key=lambda m: m.parent.name, reverse=True)
        for manifest in manifests[:MAX_SCANNED_RUNS]:
            try:
                if job_id in [str(j) for j in read_manifest(manifest.parent).get("job_ids") or []]:
                    return manifest.parent
            except RunDirError:
                continue
    return None


def job_rows(ref: RunRef, run: slurm.RunCmd = slurm.run_cmd) -> list[slurm.JobRow]:
    """Current rows of the job (one per array task); sacct fills in tasks that left the queue, and a
    task neither knows (past MinJobAge, no accounting) gets an UNKNOWN row (`forgotten_row`). A
    resumable run that saved and stopped without requeue reads STOPPED (progress.refine_state)."""
    if ref.backend == "local":
        state = local_status(RunPaths(ref.run_dir), ref.job_id) if ref.run_dir else "UNKNOWN"
        return [slurm.JobRow(ref.job_id, ref.job_id, None, state, "", "local", source="local")]
    rows = _slurm_rows(ref, run)
    if ref.array_task is not None:
        rows = [r for r in rows if r.array_task_id == ref.array_task]
    if ref.array_size and ref.array_task is None:
        seen = {r.array_task_id for r in rows}
        rows += [forgotten_row(ref, i) for i in range(ref.array_size) if i not in seen]
    elif not rows:
        rows = [forgotten_row(ref, ref.array_task)]
    if ref.run_dir is not None:
        paths = RunPaths(ref.run_dir)
        rows = [dataclasses.replace(r, slurm_state=refine_state(
            r.slurm_state, paths.task(r.array_task_id if ref.array_size else None).dir)) for r in rows]
    return sorted(rows, key=lambda r: (r.array_task_id is None, r.array_task_id or 0))


def _slurm_rows(ref: RunRef, run: slurm.RunCmd) -> list[slurm.JobRow]:
    """What squeue, then sacct, then the run dir's earlier jobs know of the job's tasks."""
    offsets = dict(ref.array_offsets)
    rows = arrays.with_offsets(slurm.query_jobs([ref.job_id], run=run)[ref.job_id], offsets)
    if rows and ref.array_size and len({r.array_task_id for r in rows}) < ref.array_size \
            and rows[0].source == "squeue":
        seen = {r.array_task_id for r in rows}
        rows += [r for r in arrays.with_offsets(slurm.sacct([ref.job_id], run=run), offsets)
                 if r.array_task_id not in seen]
    if ref.array_size and ref.earlier_jobs and len({r.array_task_id for r in rows}) < ref.array_size:
        # a resubmission of some tasks: the others' newest rows come from the earlier jobs
        seen = {r.array_task_id for r in rows}
        earlier = slurm.query_jobs(list(ref.earlier_jobs), run=run)
        for job in reversed(ref.earlier_jobs):
            for r in arrays.with_offsets(earlier.get(job, []), offsets):
                if r.array_task_id not in seen:
                    rows.append(r)
                    seen.add(r.array_task_id)
    return rows


def is_forgotten(rows: list[slurm.JobRow]) -> bool:
    """Neither squeue nor sacct knows any of the rows (see `forgotten_row`)."""
    return all(r.source == "none" for r in rows)


def check_known(ref: RunRef, rows: list[slurm.JobRow]) -> None:
    """Raise RunDirError when neither Slurm nor a run dir knows the job: a mistyped id, or a job that is
    no hpcqwen run's and that Slurm has forgotten (there is nothing true to say about it)."""
    if ref.run_dir is None and is_forgotten(rows):
        raise RunDirError(f"job {ref.job_id} is not known to Slurm, and no run dir under the run roots names it",
                          hint="check the id with `squeue --me`, or give the run dir that `hpcqwen submit` printed")


def is_finished(ref: RunRef, rows: list[slurm.JobRow]) -> bool:
    """Every task is in a terminal state (and, for Slurm arrays, every task was seen; the local backend runs
    an array's tasks in one child, reported as one row)."""
    if not rows:
        return False
    if ref.array_size and ref.array_task is None and ref.backend != "local" and len(rows) < ref.array_size:
        return False
    return all(r.state.is_terminal for r in rows)


def forgotten_row(ref: RunRef, task: int | None = None) -> slurm.JobRow:
    """An UNKNOWN row for a job (or array task) neither squeue nor sacct knows (older than
    MinJobAge, no accounting), with what the run dir says about how it ended."""
    said = ""
    if ref.run_dir is not None:
        said = ending_of(RunPaths(ref.run_dir).task(task if ref.array_size else None).dir)
    reason = "Slurm no longer knows this job" + (f"; the run dir says: {said}" if said else "")
    job_id = ref.job_id if task is None else f"{ref.job_id}_{task}"
    return slurm.JobRow(job_id, ref.job_id, task, "UNKNOWN", reason, "", source="none")


def wait_for(ref: RunRef, run: slurm.RunCmd = slurm.run_cmd, first_poll_s: float = 1.0, max_poll_s: float = 15.0,
             on_change: Callable[[list[slurm.JobRow]], None] | None = None,
             forget_after: int = 3) -> list[slurm.JobRow]:
    """Poll (one squeue call each time, backing off) until the job is finished; a job that neither
    squeue nor sacct knows for `forget_after` polls in a row ends the wait as UNKNOWN."""
    delay, last, unknown = first_poll_s, None, 0
    while True:
        rows = job_rows(ref, run=run)
        unknown = unknown + 1 if is_forgotten(rows) else 0
        summary = [(r.job_id, r.slurm_state) for r in rows]
        if on_change and summary != last:
            on_change(rows)
            last = summary
        if unknown >= forget_after or is_finished(ref, rows):
            return rows
        time.sleep(delay)
        delay = min(max_poll_s, delay * 1.5)


def log_files(ref: RunRef) -> list[Path]:
    """Log files of the job (of the named array task when there is one), oldest first."""
    if ref.run_dir is None:
        raise RunDirError(f"job {ref.job_id} has no hpcqwen run dir that could be found",
                          hint="give the run dir instead of the job id")
    logs = RunPaths(ref.run_dir).logs
    files = sorted((p for p in logs.glob("*.out")), key=lambda p: p.stat().st_mtime)
    if ref.array_task is not None:
        files = [p for p in files if p.stem.endswith(f"_{ref.array_task}")]
    return files


def failure_excerpt(text: str, lines: int = 15) -> list[str]:
    """The lines of a log that explain a failure: the first error and what led to it, else the tail.

    torchrun ends a failed run with a long footer of its own; the root cause is the first
    exception (or hpcqwen `error[...]`) printed by a rank.
    """
    all_lines = text.splitlines()
    for i, line in enumerate(all_lines):
        if re.match(r"^(error\[|[\w.]*(Error|Exception)\b.*:)", line.strip()):
            return all_lines[max(0, i - lines + 3): i + 3]
    return all_lines[-lines:]


def check_completed(ref: RunRef, rows: list[slurm.JobRow], job_id: str) -> None:
    """Return when every task COMPLETED; otherwise raise JobFailed saying how it ended (STOPPED: saved
    and resumable, with why it was not requeued; FAILED/CANCELLED/TIMEOUT/UNKNOWN: the log's tail)."""
    failed = [r for r in rows if r.slurm_state != "COMPLETED"]
    if not failed:
        return
    states = ", ".join(sorted({r.slurm_state for r in failed}))
    if all(r.slurm_state == "STOPPED" for r in failed) and ref.run_dir is not None:
        paths = RunPaths(ref.run_dir)
        why = "; ".join(sorted({paths.task(r.array_task_id if ref.array_size else None).final.read_text().strip()
                                for r in failed if paths.task(r.array_task_id if ref.array_size else None)
                                .final.is_file()}))
        raise JobFailed(f"job {job_id} ended STOPPED: stopped on request before it finished; it continues from "
                       f"its last complete checkpoint ({why})",
                        where=str(ref.run_dir), hint=f"continue it with `hpcqwen resume {ref.run_dir}`")
    logs = log_files(ref) if ref.run_dir else []
    tail = failure_excerpt(logs[-1].read_text(errors="replace")) if logs else []
    reasons = "; ".join(sorted({r.reason for r in failed if r.reason}))
    raise JobFailed(f"job {job_id} ended {states}" + (f" ({reasons})" if reasons else ""),
                    where=str(logs[-1] if logs else ref.run_dir),
                    hint="last log lines:\n    " + "\n    ".join(tail) if tail else "see the run dir's logs/")


def pick_log(ref: RunRef) -> Path | None:
    """The log to show: the named task's, else the newest file."""
    files = log_files(ref)
    return files[-1] if files else None


def read_new(path: Path, offset: int, limit: int | None = None, whole_lines: bool = False) -> tuple[str, int]:
    """What was appended since `offset`, and the new offset (restarts at 0 if truncated).
    `whole_lines` holds back a line still being written; `limit` keeps only the newest bytes
    (the monitor's log view wants the tail, not a multi-GB backlog)."""
    size = path.stat().st_size
    if size < offset:
        offset = 0
    if limit is not None and size - offset > limit:
        offset = size - limit
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1 if whole_lines else len(data)
    return data[:end].decode(errors="replace"), offset + end
