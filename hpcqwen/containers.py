"""What a job's container sees on the nodes: the bind mounts, the interpreter, and what no mount can carry.

A profile's `container` runs the launcher in pyxis (`srun --container-image`) or Apptainer (`apptainer
exec`). Inside, only the image and the bind mounts exist, so every path the job touches is mounted:
- read-write: the run root, the cache root, Megatron's `save`, the folder of an absolute distill
  `result_path`, the cache and tracker folders the environment names (`ENV_PATHS`: the submitting
  shell's, which Slurm exports to the job, then the profile's `env`, then the spec's; an MLflow
  `file:` store); the Hugging Face cache when a task names a hub id;
- read-only: model folders and dataset files or folders;
- the profile's own `container.mounts`, as written.
Reward plugins and DeepSpeed configs need no mount: they are copied into the run dir (`inputs.py`).
A path is mounted at itself from its real location (symlinks resolved); a folder whose top-level links
lead outside it (a hub-cache snapshot's links into `blobs/`) is mounted from the folder holding both; a
writable folder that does not exist yet is created on submit (`make_missing_folders`: a mount's source
must exist when srun starts; the cache root as the cache creates it); a mount inside another that
already shows it with the same or more rights is dropped, and parents come first (a writable folder
inside a read-only one is mounted after it). `,` and `:` separate mounts and their parts in both
runtimes, so a path holding one is refused on submit, as is a relative one. The interpreter is the
profile's `python`, else `python3` from the image's PATH: the submitting machine's `sys.executable`
means nothing inside an image.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcqwen.errors import UnsafeValue

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView

# Cache folders that libraries on the nodes write to when these are set.
ENV_PATHS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
             "TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "WANDB_DIR", "MLFLOW_TRACKING_URI")
CONTAINER_PYTHON = "python3"
MOUNT_SEPARATORS = (",", ":")
MAX_LINKS_SCANNED = 1000  # top-level entries of a folder looked at for links that lead outside it


@dataclass(frozen=True)
class Need:
    """A path the job touches, and the spec key (or environment variable) that names it."""

    key: str
    path: str
    writable: bool


@dataclass(frozen=True)
class Mount:
    """One bind mount: `src` on the node at `dst` in the container."""

    src: str
    dst: str
    writable: bool

    def __str__(self) -> str:
        return f"{self.src}:{self.dst}" + ("" if self.writable else ":ro")


def node_python(spec: SpecView) -> str:
    """The interpreter that runs the launcher on the nodes."""
    if spec.cluster.python:
        return spec.cluster.python
    return CONTAINER_PYTHON if spec.cluster.container is not None else sys.executable


def container_mounts(spec: SpecView, environ: Mapping[str, str] | None = None) -> list[Mount]:
    """The container's bind mounts, parents first (empty without a container).

    Raises:
        UnsafeValue: a path no mount can carry (validation refuses these first; this is the last line).
    """
    mounts, problems = mount_plan(spec, os.environ if environ is None else environ)
    if problems:
        p = problems[0]
        raise UnsafeValue(f"cannot mount {p.got!r} ({p.key}) into the container: {p.message}", hint=p.hint)
    return mounts


def container_problems(spec: SpecView, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """What no container mount can carry, one problem per spec key (empty without a container)."""
    return mount_plan(spec, os.environ if environ is None else environ)[1]


def mount_plan(spec: SpecView, environ: Mapping[str, str]) -> tuple[list[Mount], list[Problem]]:
    """(mounts, problems) for the job's container."""
    if spec.cluster.container is None:
        return [], []
    mounts, problems = [], []
    for need in needs(spec, environ):
        mount, problem = _mount_for(need)
        if problem is not None:
            problems.append(problem)
        elif mount is not None:
            mounts.append(mount)
    mounts += [profile_mount(text) for text in spec.cluster.container.mounts]
    merged, conflicts = _merge(mounts)
    return merged, problems + conflicts


def needs(spec: SpecView, environ: Mapping[str, str]) -> list[Need]:
    """Every path the job touches, with the key that names it."""
    c = spec.cluster
    out = [Need("cluster.run_root", c.run_root, True)]
    if c.cache_root:
        out.append(Need("cluster.cache_root", c.cache_root, True))
    env = {**{k: (k, v) for k, v in environ.items()}, **{k: (f"cluster.env.{k}", v) for k, v in c.env.items()},
           **{k: (f"env.{k}", v) for k, v in spec.env.items()}}
    for name in ENV_PATHS:
        key, value = env.get(name, ("", ""))
        if name == "MLFLOW_TRACKING_URI":  # a server needs no mount; a file store does
            value = value.removeprefix("file://").removeprefix("file:") if value.startswith("file:") else ""
        if value:
            out.append(Need(key, value, True))
    hub = False
    for prefix, task in _tasks(spec):
        task_needs, uses_hub = _task_needs(prefix, task)
        out += task_needs
        hub = hub or uses_hub
    if hub and not any(env.get(name, ("", ""))[1] for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")):
        home = environ.get("HOME") or str(Path.home())
        out.append(Need("HF_HOME (default: ~/.cache/huggingface, for the task's hub ids)",
                        str(Path(home) / ".cache" / "huggingface"), True))
    return out


def _tasks(spec: SpecView) -> list[tuple[str, Any]]:
    if spec.array is None or not spec.array.tasks:
        return [("task", spec.task)]
    return [("task", spec.task)] + [(f"array.tasks[{i}]", spec.task_for(i)) for i in range(spec.array.count)]


def _task_needs(prefix: str, task: Any) -> tuple[list[Need], bool]:
    """(paths of one task's model, data, checkpoints and results, whether it names a hub id)."""
    from hpcqwen.data.formats import split_dataset_ref
    from hpcqwen.tasks._common import is_hub_id

    out, hub = [], False
    for field in ("model", "adapters", "load"):  # model folders (read)
        value = getattr(task, field, None)
        if isinstance(value, str):
            hub = hub or is_hub_id(value)
            out += [] if is_hub_id(value) else [Need(f"{prefix}.{field}", value, False)]
    for field in ("dataset", "val_dataset"):  # data files and folders (read)
        for i, ref in enumerate(getattr(task, field, None) or []):
            path = split_dataset_ref(ref)[0]
            hub = hub or is_hub_id(path)
            out += [] if is_hub_id(path) else [Need(f"{prefix}.{field}[{i}]", path, False)]
    save = getattr(task, "save", None)
    if isinstance(save, str):  # Megatron checkpoints outside the run dir (written)
        out.append(Need(f"{prefix}.save", save, True))
    result = getattr(task, "result_path", None)
    if isinstance(result, str) and Path(result).is_absolute():  # a distill result outside the run dir (written)
        out.append(Need(f"{prefix}.result_path", str(Path(result).parent), True))
    return out, hub


def _mount_for(need: Need) -> tuple[Mount | None, Problem | None]:
    """The mount that shows `need.path` in the container, or the problem that prevents one."""
    from hpcqwen.errors import Problem

    hint = "move or link it to an absolute path without ',' or ':', or set it so"
    if not os.path.isabs(need.path):
        return None, Problem(need.key, "is not an absolute path; a container mount needs one", got=need.path,
                             hint="give the absolute path")
    path = os.path.normpath(need.path)
    if not os.path.lexists(path) and not need.writable:
        return None, None  # a missing input: the task's own check reports it
    src = os.path.realpath(path) if os.path.lexists(path) else path  # a missing output folder: made on submit
    outside = list(_links_outside(src)) if os.path.isdir(src) else []
    if outside:
        common = os.path.commonpath([src, *outside])
        if common == "/" or src != path:
            return None, Problem(need.key, f"is a folder whose links lead to {outside[0]}, outside it; no single "
                                 "mount shows both", got=need.path, hint="give the folder the links point into, "
                                 "or copy the files")
        src = path = common
    for text in (need.path, src):
        bad = next((c for c in MOUNT_SEPARATORS if c in text), None)
        if bad is not None:
            return None, Problem(need.key, f"contains {bad!r}, which the container mount syntax uses as a "
                                 "separator (pyxis --container-mounts, apptainer --bind)", got=text, hint=hint)
    return Mount(src, path, need.writable), None


def _links_outside(folder: str) -> Iterator[str]:
    """Real targets of the folder's top-level symlinks that lie outside it (at most MAX_LINKS_SCANNED entries)."""
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= MAX_LINKS_SCANNED:
                    return
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([folder, target]) != folder:
                        yield target
    except OSError:
        return


def make_missing_folders(spec: SpecView, environ: Mapping[str, str] | None = None) -> None:
    """Create the writable folders a container job mounts that do not exist yet (a mount's source must
    exist when srun starts): the cache root as the cache makes it (a shared drop box), the others plainly.

    Raises:
        HpcqwenError: a folder that cannot be created here (naming it and the spec key).
    """
    from hpcqwen.caching import CacheSettings, make_cache_root
    from hpcqwen.errors import HpcqwenError

    mounts = {m.dst for m in mount_plan(spec, os.environ if environ is None else environ)[0]}
    for need in needs(spec, os.environ if environ is None else environ):
        path = os.path.normpath(need.path)
        if not need.writable or os.path.lexists(path) or path not in mounts:
            continue
        try:
            if need.key == "cluster.cache_root":
                make_cache_root(Path(path), CacheSettings.from_profile(spec.cluster))
            else:
                Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HpcqwenError(f"cannot create {path} ({need.key}), which the container mounts: {e.strerror or e}",
                               hint="create it on the shared filesystem, or point the setting elsewhere") from None


def profile_mount(text: str) -> Mount:
    """A profile's `SRC[:DST[:ro|rw]]` (checked when the profile loads)."""
    parts = text.split(":")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    return Mount(src, dst, parts[2:] != ["ro"])


def _merge(mounts: list[Mount]) -> tuple[list[Mount], list[Problem]]:
    """Drop mounts that another already shows with the same or more rights; parents first."""
    from hpcqwen.errors import Problem

    kept: list[Mount] = []
    problems = []
    for m in sorted(mounts, key=lambda m: (len(Path(m.dst).parts), m.dst)):
        same = next((i for i, k in enumerate(kept) if k.dst == m.dst), None)
        if same is not None:
            if kept[same].src != m.src:
                problems.append(Problem("cluster.container.mounts", f"{m.dst} would be mounted from both "
                                        f"{kept[same].src} and {m.src}", got=str(m)))
            elif m.writable:
                kept[same] = m
            continue
        parents = [k for k in kept if Path(k.dst) in Path(m.dst).parents]
        parent = max(parents, key=lambda k: len(k.dst)) if parents else None
        if parent is not None and (parent.writable or not m.writable) and _shows(parent, m):
            continue
        kept.append(m)
    return kept, problems


def _shows(parent: Mount, child: Mount) -> bool:
    """The parent mount shows the child's source at the child's place."""
    inside = os.path.join(parent.src, os.path.relpath(child.dst, parent.dst))
    return os.path.realpath(inside) == os.path.realpath(child.src)
