"""Spec -> sbatch script. Pure: the same spec, paths, source and environment give the same bytes.

All decisions are made here in Python (`sbatch_context`); the Jinja template only writes them
out. Jinja runs with StrictUndefined, and every value that a spec controls goes through
`shlex.quote` (`|q`) or is restricted by the spec's patterns before it reaches `#SBATCH`; as a
last line of defence every `#SBATCH` option and dependency id is checked here again, and a value
that fails is refused (`UnsafeValue`) rather than written. `render` writes a preview (no run dir
exists yet); `submit` writes the script of a real run dir.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from hpcqwen import __version__
from hpcqwen.arrays import OFFSET_ENV
from hpcqwen.cluster import PKG_DIR
from hpcqwen.containers import container_mounts, node_python
from hpcqwen.errors import UnsafeValue
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.paths import RunPaths
from hpcqwen.spec import JobSpec, SpecSource

TEMPLATE = "sbatch.sh.j2"
LAUNCH_MODULE = "hpcqwen"  # `python -m hpcqwen launch RUN_DIR`
# What sbatch's #SBATCH parser reads literally: it splits at whitespace, strips quotes, drops `\`
# and ends the line at `#`. `%` is a filename pattern; only --output (%x, %j, %A, %a) and --array
# (%N, the throttle) may carry one, and only as hpcqwen wrote it.
_FLAG_RE = re.compile(r"--[a-z][a-z-]*(=[^\s'\"#\\%\x00-\x1f\x7f]+)?")
_PATTERN_FLAGS = {"--output": re.compile(r"[^\s'\"#\\%\x00-\x1f\x7f]*/%x-(%j|%A_%a)\.out"),
                  "--array": re.compile(r"[0-9,-]+(%[0-9]+)?")}  # 0-99%4, or some tasks: 1,3%4
DEPENDENCY_TYPES = ("afterok", "afterany", "afternotok", "after")


def template_dirs(spec: JobSpec) -> list[Path]:
    """The profile's template folder first, then the shipped one (wheel or source checkout)."""
    dirs = [Path(spec.cluster.template_dir)] if spec.cluster.template_dir else []
    return [*dirs, PKG_DIR / "templates", PKG_DIR.parent / "templates"]


def format_time(minutes: int) -> str:
    """Minutes -> Slurm's D-HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


def cpus_per_task(spec: JobSpec) -> int:
    """Cores for each node's launcher: the spec's, else cpus_per_gpu × GPUs, else nproc."""
    if spec.resources.cpus_per_task:
        return spec.resources.cpus_per_task
    return spec.cluster.cpus_per_gpu * spec.gpus_per_node if spec.gpus_per_node else spec.nproc_per_node


def dependency_flag(job_ids: dict[str, list[str]]) -> str | None:
    """{'afterok': ['1', '2']} -> 'afterok:1:2'.

    Raises:
        UnsafeValue: a type that is not a Slurm dependency type, or an id that is not a job id.
    """
    for kind, ids in job_ids.items():
        bad = [i for i in ids if not JOB_ID_RE.fullmatch(i)]
        if kind not in DEPENDENCY_TYPES or bad:
            raise UnsafeValue(f"refusing to write the dependency {kind}:{(bad or [''])[0][:40]!r} into the script",
                              hint="a dependency is afterok/afterany/afternotok/after and job ids such as 123 or 123_4")
    parts = [f"{kind}:{':'.join(ids)}" for kind, ids in job_ids.items() if ids]
    return ",".join(parts) or None


def array_flag(spec: JobSpec, first: int = 0, last: int | None = None,
               tasks: Sequence[int] | None = None) -> str | None:
    """`0-99%4` for an array (or one chunk of it, or `1,3%4` for some of its tasks), None for a plain job."""
    if spec.array is None:
        return None
    throttle = f"%{spec.array.throttle}" if spec.array.throttle else ""
    if tasks:
        return ",".join(str(int(t)) for t in tasks) + throttle
    last = spec.array.count - 1 if last is None else last
    return f"{first}-{last}{throttle}" if last > first else f"{first}{throttle}"


def sbatch_flags(spec: JobSpec, paths: RunPaths, dependencies: dict[str, list[str]],
                 array_tasks: Sequence[int] | None = None, array_count: int | None = None) -> list[str]:
    """Every `#SBATCH` line's option, in a fixed order (`array_tasks`: only these tasks of the array;
    `array_count`: a chunk of that many tasks, hpcqwen.arrays)."""
    r, c = spec.resources, spec.cluster
    flags = [
        f"--job-name={spec.name}",
        f"--nodes={r.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus_per_task(spec)}",
        f"--time={format_time(r.time_limit_min)}",
        f"--output={paths.log_pattern(spec.array is not None)}",
        "--open-mode=append",
        f"--chdir={paths.root}",
    ]
    if spec.gpus_per_node:
        flags.append(f"--gpus-per-node={spec.gpus_per_node}")
    if r.mem_gb is not None:
        flags.append(f"--mem={math.ceil(r.mem_gb * 1024)}M")  # never 0: --mem=0 means the whole node
    for key in ("partition", "account", "qos"):
        value = getattr(r, key) or getattr(c, key)
        if value:
            flags.append(f"--{key}={value}")
    if r.constraint:
        flags.append(f"--constraint={r.constraint}")
    if r.exclusive:
        flags.append("--exclusive")
    if spec.requeue.enabled:
        flags += ["--requeue", f"--signal=B:USR2@{spec.requeue.signal_lead_s}"]
    else:
        flags.append("--no-requeue")
    array = array_flag(spec, last=None if array_count is None else array_count - 1, tasks=array_tasks)
    if array:
        flags.append(f"--array={array}")
    dep = dependency_flag(dependencies)
    if dep:
        flags.append(f"--dependency={dep}")
    for flag in flags:
        check_flag(flag)
    return flags


def check_flag(flag: str) -> None:
    """Refuse an `#SBATCH` option that sbatch would not read as written (see _FLAG_RE).

    Raises:
        UnsafeValue: naming the option.
    """
    name, _, value = flag.partition("=")
    pattern = _PATTERN_FLAGS.get(name)
    if (pattern.fullmatch(value) if pattern and "%" in value else _FLAG_RE.fullmatch(flag)) is None:
        raise UnsafeValue(f"refusing to write `#SBATCH {flag[:80]!r}`: sbatch would not read it as written",
                          hint="a spec value with spaces, quotes, #, % or \\ got past validation; report it")


def launcher_argv(spec: JobSpec, run_dir: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """`<python> -m hpcqwen launch RUN_DIR`, inside the profile's Apptainer container when it has one
    (`environ`: the environment the job gets, which names cache folders to mount; default: this process's)."""
    argv = [node_python(spec), "-m", LAUNCH_MODULE, "launch", str(run_dir)]
    container = spec.cluster.container
    if container is not None and container.runtime == "apptainer":
        binds = ",".join(map(str, container_mounts(spec, environ)))
        gpus = ["--nv"] if spec.gpus_per_node else []
        argv = ["apptainer", "exec", *gpus, "--pwd", str(run_dir), "--bind", binds, container.image, *argv]
    return argv


def pyxis_args(spec: JobSpec, run_dir: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """srun's pyxis options for the profile's pyxis container (none without one)."""
    container = spec.cluster.container
    if container is None or container.runtime != "pyxis":
        return []
    mounts = ",".join(map(str, container_mounts(spec, environ)))
    return [f"--container-image={container.image}", f"--container-mounts={mounts}",
            f"--container-workdir={run_dir}"]


def srun_argv(spec: JobSpec, run_dir: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """The one step: one launcher per node, the job dies if one node's launcher fails."""
    # 23.11+ srun no longer inherits --cpus-per-task from sbatch: pass it explicitly.
    argv = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--cpus-per-task={cpus_per_task(spec)}"]
    return argv + pyxis_args(spec, run_dir, environ) + launcher_argv(spec, run_dir, environ)


def setup_lines(setup: Sequence[str]) -> list[str]:
    """The profile's setup lines, each followed by a check of its exit status.

    They run before `set -u` (site scripts read unset variables: module init, conda activate), and the
    first that fails ends the batch script with its code before anything starts; a failing `module load`
    would otherwise be ignored and the job fail later, far from the cause. Used by the sbatch template and
    the submitit backend alike.
    """
    out = []
    for number, line in enumerate(setup, 1):
        said = shlex.quote(f"hpcqwen: profile setup line {number} failed (exit ")
        why = shlex.quote(f"); nothing was started: {line}")
        out += [line, f'rc=$?; [ "$rc" = 0 ] || {{ echo {said}"$rc"{why} >&2; exit "$rc"; }}']
    return out


def task_lines(spec: JobSpec) -> list[str]:
    """`key: value` for every task knob the spec sets (what the node reads from spec.json), so the
    script shows the job's settings next to its resources."""
    import json

    set_knobs = spec.task.model_dump(mode="json", exclude_unset=True)
    set_knobs.setdefault("kind", spec.task.kind)
    return [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in set_knobs.items()]


def sbatch_context(spec: JobSpec, paths: RunPaths, source: SpecSource,
                   dependencies: dict[str, list[str]] | None = None,
                   array_tasks: Sequence[int] | None = None, *, preview: bool = False, array_offset: int = 0,
                   array_count: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the template writes, decided here (pure for a given `environ`, the environment the job
    gets: its cache folders are mounted into a container); `array_tasks`: a resubmission of some tasks;
    `preview`: for `hpcqwen render` (no run dir); `array_offset`/`array_count`: one chunk of an array
    larger than MaxArraySize, whose local index i is task `array_offset + i` (hpcqwen.arrays)."""
    is_array = spec.array is not None
    run_dir_q = shlex.quote(str(paths.root))
    task_index = f'"$((SLURM_ARRAY_TASK_ID + {int(array_offset)}))"' if array_offset else '"$SLURM_ARRAY_TASK_ID"'
    return {
        "version": __version__,
        "source_path": source.path,
        "source_sha256": source.sha256,
        "preview": preview,
        "submit_command": shlex.join(["hpcqwen", "submit", source.path,
                                      *(a for o in source.overrides for a in ("--set", o))]),
        "sbatch_path": str(paths.sbatch),
        "task_lines": task_lines(spec),
        "sbatch_flags": sbatch_flags(spec, paths, dependencies or {}, array_tasks, array_count),
        "setup": setup_lines(spec.cluster.setup),
        "run_dir": str(paths.root),
        "env": sorted({**spec.cluster.env, **spec.env, **({OFFSET_ENV: str(int(array_offset))} if array_offset
                                                          else {})}.items()),
        "task_dir": run_dir_q + "/tasks/" + task_index if is_array else '"$HPCQWEN_RUN_DIR"',
        "srun_command": shlex.join(srun_argv(spec, paths.root, environ)),
        "requeue": spec.requeue.enabled,
        "signal_lead_s": spec.requeue.signal_lead_s,
        "max_restarts": spec.requeue.max_restarts,
        "requeue_on_failure": "true" if spec.requeue.on_failure else "false",  # bash builtins
        "requeue_id": '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' if is_array else '"$SLURM_JOB_ID"',
    }


def _environment(spec: JobSpec) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in template_dirs(spec)]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 (a shell script, not HTML: values go through |q)
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["comment"] = lambda v: str(v).replace("\r", "\\r").replace("\n", "\\n")
    return env


def render_sbatch(spec: JobSpec, paths: RunPaths, source: SpecSource,
                  dependencies: dict[str, list[str]] | None = None, array_tasks: Sequence[int] | None = None,
                  *, preview: bool = False, array_offset: int = 0, array_count: int | None = None,
                  environ: Mapping[str, str] | None = None) -> str:
    """The batch script for `spec` running in `paths` (`array_tasks`: a resubmission of some tasks;
    `preview`: the header says no run dir exists yet; `array_offset`/`array_count`: a chunk; `environ`:
    the job's environment, default this process's)."""
    context = sbatch_context(spec, paths, source, dependencies, array_tasks, preview=preview,
                             array_offset=array_offset, array_count=array_count, environ=environ)
    return _environment(spec).get_template(TEMPLATE).render(**context)
