"""Submit, watch, cancel and resume a pipeline: one sbatch per stage, Slurm dependencies between them.

`submit_pipeline` checks every stage first (`load_pipeline`: spec and files; `check_pipeline`: the
preflight, cluster included), then makes the pipeline dir, writes the record and submits the stages
producers first, each with `--dependency` on its producers' jobs (arrays stay arrays; chunks under
MaxArraySize as for a plain submit). If any sbatch fails, every stage already queued is cancelled
and the pipeline dir removed: nothing half-submitted stays. `resume_pipeline` resubmits only what did
not finish — a finished stage is never redone unless its input changed (a producer it depends on is
redone, or the output it used is no longer what the producer holds now), and then in a fresh run dir.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hpcqwen import fs, runs, slurm
from hpcqwen.backends import Backend
from hpcqwen.errors import HpcqwenError, RunDirError, SpecError, SpecIssue
from hpcqwen.paths import RunPaths, new_run_dir
from hpcqwen.pipeline.definition import Pipeline, Stage
from hpcqwen.pipeline.outputs import INPUTS, UNRESOLVED
from hpcqwen.pipeline.record import SOURCE, STAGES, PipelineRecord, StageRecord, new_record, read_record, write_record
from hpcqwen.preflight import Report, run_checks
from hpcqwen.spec import problem_issues, read_frozen_spec
from hpcqwen.submit import resolve_dependencies, resubmit, submit, unfinished_tasks

LIVE = ("RUNNING", "PENDING")


@dataclass(frozen=True)
class StageStatus:
    """A stage now."""

    name: str
    kind: str
    state: str  # Slurm's (an array's most telling), NOT SUBMITTED, or UNKNOWN
    job_ids: tuple[str, ...]
    reason: str
    blocked_on: str  # "" or what it waits for / why it never runs
    run_dir: str


def check_pipeline(pipeline: Pipeline, *, cluster: bool, probe: bool = False,
                   run: slurm.RunCmd = slurm.run_cmd) -> dict[str, Report]:
    """The preflight of every stage (its files were checked by load_pipeline)."""
    return {name: run_checks(stage.spec, cluster=cluster, probe=probe, run=run)
            for name, stage in pipeline.stages.items()}


def raise_errors(pipeline: Pipeline, reports: dict[str, Report]) -> None:
    """One SpecError with every stage's preflight errors, each at its line."""
    issues: list[SpecIssue] = []
    for name, report in reports.items():
        if report.errors:
            stage = pipeline.stages[name]
            issues += stage.remap(problem_issues(stage.source, report.errors), pipeline.doc)
    if issues:
        raise SpecError(str(pipeline.path), issues)


def _stage_record(stage: Stage, run_dir: Path) -> StageRecord:
    return StageRecord(str(run_dir), stage.spec.task.kind, [list(e) for e in stage.after],
                       [list(r) for r in stage.refs])


def _dependencies(stage: Stage, jobs: dict[str, list[str]], base: dict[str, list[str]]) -> dict[str, list[str]]:
    """The stage's own depends_on plus its producers' (re)submitted jobs."""
    deps = {k: list(v) for k, v in base.items()}
    for kind, other in stage.after:
        if jobs.get(other):
            deps.setdefault(kind, []).extend(jobs[other])
    return deps


def submit_pipeline(pipeline: Pipeline, backend: Backend, array_limit: int | None) -> tuple[Path, dict[str, list[str]]]:
    """Make the pipeline dir and submit every stage; on a failure cancel what was queued and remove it all."""
    first = next(iter(pipeline.stages.values())).spec
    final = new_run_dir(first.cluster.run_root, pipeline.name, pipeline.sha256)
    staging = final.with_name(f".{final.name}.staging")
    (staging / STAGES).mkdir(parents=True)
    record = new_record(pipeline.name, str(pipeline.path), pipeline.sha256,
                        {n: _stage_record(s, final / STAGES / n) for n, s in pipeline.stages.items()})
    jobs: dict[str, list[str]] = {}
    try:
        (staging / SOURCE).write_text(pipeline.text, encoding="utf-8")
        write_record(staging, record)
        staging.rename(final)
        for name, stage in pipeline.stages.items():
            deps = _dependencies(stage, jobs, resolve_dependencies(stage.spec, stage.source.path))
            sub = submit(stage.spec, stage.source, backend, array_limit, final / STAGES / name, deps)
            jobs[name] = record.stages[name].job_ids = sub.job_ids
            write_record(final, record)
    except BaseException:
        _cancel(j for ids in jobs.values() for j in ids)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final, jobs


def _cancel(job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if ids:
        with contextlib.suppress(HpcqwenError):
            slurm.scancel(ids)


# ---- status -------------------------------------------------------------------------------------

def stage_state(st: StageRecord, run: slurm.RunCmd = slurm.run_cmd) -> tuple[str, str]:
    """(state, reason) of one stage: its array's most telling state, or what its run dir says."""
    from hpcqwen.monitor import array_state

    if not st.job_ids:
        return "NOT SUBMITTED", ""
    ref = runs.resolve_target(st.run_dir, run)
    rows = runs.job_rows(ref, run)
    if not rows:
        spec = read_frozen_spec(RunPaths(Path(st.run_dir)).spec_json)
        done = not unfinished_tasks(spec, RunPaths(Path(st.run_dir)))
        return ("COMPLETED", "Slurm forgot it; every task's OUTCOME is done") if done else ("UNKNOWN", "NotInQueue")
    state = array_state([r.slurm_state for r in rows])
    return state, next((r.reason for r in rows if r.slurm_state == state and r.reason), "")


def pipeline_status(pipeline_dir: Path, run: slurm.RunCmd = slurm.run_cmd) -> list[StageStatus]:
    """Every stage's state, and for a waiting stage the stage it waits for (or why it never runs)."""
    record = read_record(pipeline_dir)
    states = {n: stage_state(st, run) for n, st in record.stages.items()}
    out = []
    for name, st in record.stages.items():
        state, reason = states[name]
        out.append(StageStatus(name, st.kind, state, tuple(st.job_ids), reason, _blocked_on(st, states, state),
                               st.run_dir))
    return out


def _blocked_on(st: StageRecord, states: dict[str, tuple[str, str]], state: str) -> str:
    if state not in ("PENDING", "NOT SUBMITTED", "CANCELLED"):
        return ""
    for kind, other in st.after:
        other_state = states.get(other, ("UNKNOWN", ""))[0]
        if other_state in LIVE or other_state == "REQUEUED":
            return f"waits for {other} ({other_state})"
        if kind == "afterok" and other_state != "COMPLETED":
            return f"never runs: {other} ended {other_state}"
    return ""


def wait_pipeline(pipeline_dir: Path, run: slurm.RunCmd = slurm.run_cmd) -> list[StageStatus]:
    """Poll (backing off) until every stage ended or can never run; a stage Slurm no longer knows (UNKNOWN)
    for three polls in a row counts as ended, as `hpcqwen submit --wait` does."""
    delay, unknown = 2.0, 0
    while True:
        statuses = pipeline_status(pipeline_dir, run)
        waiting = [s for s in statuses if not (slurm.SLURM_STATES.get(s.state, slurm.JobState.FAILED).is_terminal
                                               or s.blocked_on.startswith("never runs"))]
        unknown = unknown + 1 if waiting and all(s.state == "UNKNOWN" for s in waiting) else 0
        if not waiting or unknown >= 3:
            return statuses
        time.sleep(delay)
        delay = min(15.0, delay * 1.3)


def overall_state(statuses: list[StageStatus]) -> str:
    """The pipeline's state: running beats pending; all done is COMPLETED; else the first bad stage's."""
    from hpcqwen.monitor import array_state

    return array_state([s.state for s in statuses])


# ---- cancel, resume ---------------------------------------------------------------------------------

def cancel_pipeline(pipeline_dir: Path, run: slurm.RunCmd = slurm.run_cmd) -> list[str]:
    """Cancel every stage still queued or running (their ranks save first); returns the stages cancelled."""
    statuses = pipeline_status(pipeline_dir, run)
    live = [s for s in statuses if slurm.SLURM_STATES.get(s.state) in (slurm.JobState.RUNNING, slurm.JobState.PENDING)]
    if live:
        slurm.scancel([j for s in live for j in s.job_ids], run=run)
    return [s.name for s in live]


def _outputs_changed(st: StageRecord) -> bool:
    """The values this stage's references resolved to are no longer what the producers hold."""
    from hpcqwen.pipeline.outputs import output_value

    used = fs.read_json(Path(st.run_dir) / INPUTS)
    if not isinstance(used, dict):
        return False
    record = read_record(Path(st.run_dir).parent.parent)
    for key, value in used.items():
        stage, _, output = str(key).removeprefix("${stages.").removesuffix("}").partition(".")
        if stage not in record.stages or output == "export":
            continue  # a producer that trained further was resubmitted, which redoes this stage anyway
        try:
            now = output_value(Path(record.stages[stage].run_dir), output)
        except HpcqwenError:
            return True
        if now != value:
            return True
    return False


def resume_pipeline(pipeline_dir: Path, backend: Backend, array_limit: int | None,
                    run: slurm.RunCmd = slurm.run_cmd) -> dict[str, list[str]]:
    """Resubmit the stages that did not finish (and those whose input changed); returns their new jobs."""
    record = read_record(pipeline_dir)
    statuses = {s.name: s for s in pipeline_status(pipeline_dir, run)}
    live = [s for s in statuses.values() if s.state == "RUNNING" or (s.state == "PENDING" and s.reason !=
                                                                         "DependencyNeverSatisfied")]
    if live:
        raise HpcqwenError(f"stage {live[0].name} is still {live[0].state}", where=str(pipeline_dir),
                           hint=f"wait for it, or `hpcqwen pipeline cancel {pipeline_dir}` first")
    _cancel(j for s in statuses.values() if s.state == "PENDING" for j in s.job_ids)
    jobs: dict[str, list[str]] = {}
    for name, st in record.stages.items():
        upstream = any(other in jobs for _, other in st.after)
        finished = statuses[name].state != "NOT SUBMITTED" and not unfinished_tasks(
            read_frozen_spec(RunPaths(Path(st.run_dir)).spec_json), RunPaths(Path(st.run_dir)))
        if finished and not upstream and not _outputs_changed(st):
            continue
        deps: dict[str, list[str]] = {}
        for kind, other in st.after:
            if jobs.get(other):
                deps.setdefault(kind, []).extend(jobs[other])
        jobs[name] = _redo(pipeline_dir, record, name, backend, deps, array_limit) if finished else \
            _continue(Path(st.run_dir), backend, deps, array_limit)
        st.job_ids = [*st.job_ids, *jobs[name]]
        write_record(pipeline_dir, record)
    if not jobs:
        raise RunDirError(f"nothing to resume in {pipeline_dir}: every stage finished",
                          hint="`hpcqwen pipeline status` shows it")
    record.resumes.append({"stages": dict(jobs)})
    write_record(pipeline_dir, record)
    return jobs


def _restore_refs(run_dir: Path) -> None:
    """Put the unresolved spec back, so the node resolves the references against the producers' outputs now."""
    unresolved = run_dir / UNRESOLVED
    if unresolved.is_file():
        fs.write_atomic(RunPaths(run_dir).spec_json, unresolved.read_text(encoding="utf-8"))
        unresolved.unlink()
        (run_dir / INPUTS).unlink(missing_ok=True)


def _continue(run_dir: Path, backend: Backend, deps: dict[str, list[str]], array_limit: int | None) -> list[str]:
    _restore_refs(run_dir)
    return resubmit(run_dir, backend, dependencies=deps, array_limit=array_limit).job_ids


def _redo(pipeline_dir: Path, record: PipelineRecord, name: str, backend: Backend, deps: dict[str, list[str]],
          array_limit: int | None) -> list[str]:
    """A finished stage whose input changed: the same spec again in a fresh run dir `stages/<name>.<n>`."""
    from hpcqwen.spec import SpecSource

    st = record.stages[name]
    old = Path(st.run_dir)
    spec = read_frozen_spec(old / (UNRESOLVED if (old / UNRESOLVED).is_file() else "spec.json"))
    text = RunPaths(old).spec_yaml.read_text(encoding="utf-8")
    source = SpecSource(str(old / "spec.yaml"), text, "0" * 64)
    fresh = pipeline_dir / STAGES / f"{name}.{len(st.earlier_run_dirs) + 1}"
    sub = submit(spec, source, backend, array_limit, fresh, deps)
    st.earlier_run_dirs.append(st.run_dir)
    st.run_dir = str(fresh)
    return sub.job_ids
