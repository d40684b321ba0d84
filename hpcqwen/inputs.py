"""Small files a spec names by path that the nodes read while the job runs: reward plugin files and
DeepSpeed config files. They are copied into `RUN_DIR/inputs/` at submit and the frozen spec names the
copies, so a file edited (or deleted) after `hpcqwen submit` does not change a queued or requeued job;
the manifest records each one's key, source path and sha256 (`inputs`).

The copies are named by content (`<sha256[:16]>-<file name>`), read-only, and hashed from the very bytes
that are written. Module plugins (`package.module:function`) are installed code, like hpcqwen itself: they
are not copied; the manifest records the source file the nodes' import system would find here. Model
folders and datasets are not copied either (too big; the data cache keys them by content).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcqwen.errors import SpecError, SpecIssue
from hpcqwen.paths import INPUTS, RunPaths
from hpcqwen.rewards.plugins import is_plugin_ref, split_plugin_ref
from hpcqwen.rewards.static import module_source
from hpcqwen.spec import JobSpec
from hpcqwen.tasks._common import ZERO_PRESETS

MAX_INPUT_BYTES = 4 << 20  # plugins and DeepSpeed configs are kilobytes


@dataclass(frozen=True)
class InputFile:
    """One referenced file as it will be in the run dir."""

    key: str  # where the spec names it: task.deepspeed, array.tasks[1].reward_funcs[0]
    source: str  # the path the spec named (absolute)
    name: str  # its copy's name in RUN_DIR/inputs/
    data: bytes
    function: str | None = None  # a reward plugin's function (None: a DeepSpeed config)

    @property
    def sha256(self) -> str:
        """Hash of the copied bytes."""
        return hashlib.sha256(self.data).hexdigest()


def freeze_inputs(spec: JobSpec, run_dir: Path, spec_file: str) -> tuple[JobSpec, list[InputFile]]:
    """The spec with every referenced plugin/DeepSpeed file replaced by its copy in `run_dir`, and the files.

    Raises:
        SpecError: a file that cannot be read any more or is too big (it was checked at load: it changed since).
    """
    files: dict[str, InputFile] = {}
    issues: list[SpecIssue] = []

    def copy_of(key: str, path: str, function: str | None = None) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
            if len(data) > MAX_INPUT_BYTES:
                raise ValueError(f"larger than {MAX_INPUT_BYTES >> 20} MiB")
        except (OSError, ValueError) as e:
            issues.append(SpecIssue(spec_file, None, key, f"cannot copy {path} into the run dir: {e}",
                                    hint="the file changed after validation; submit again"))
            return path
        item = InputFile(key, path, f"{hashlib.sha256(data).hexdigest()[:16]}-{Path(path).name}", data, function)
        files[key] = item
        return str(RunPaths(run_dir).inputs / item.name)

    task = _rewrite(spec.task.model_dump(mode="json"), "task", copy_of)
    update: dict[str, Any] = {"task": type(spec.task).model_validate(task)}
    if spec.array is not None and spec.array.tasks:
        tasks = [_rewrite(dict(o), f"array.tasks[{i}]", copy_of) for i, o in enumerate(spec.array.tasks)]
        update["array"] = spec.array.model_copy(update={"tasks": tasks})
    if issues:
        raise SpecError(spec_file, issues)
    return spec.model_copy(update=update), list(files.values())


def _rewrite(task: dict[str, Any], where: str, copy_of: Any) -> dict[str, Any]:
    """`deepspeed` and `reward_funcs` of one task (or one array task's overrides) pointed at the copies."""
    ds = task.get("deepspeed")
    if isinstance(ds, str) and ds not in ZERO_PRESETS:
        task["deepspeed"] = copy_of(f"{where}.deepspeed", ds)
    rewards = task.get("reward_funcs")
    if isinstance(rewards, (str, list)):
        refs = [rewards] if isinstance(rewards, str) else rewards
        task["reward_funcs"] = [_plugin_copy(ref, f"{where}.reward_funcs[{i}]", copy_of)
                                for i, ref in enumerate(refs)]
    return task


def _plugin_copy(ref: Any, key: str, copy_of: Any) -> Any:
    if not isinstance(ref, str) or not is_plugin_ref(ref):
        return ref
    target, func = split_plugin_ref(ref, Path("/"))
    return f"{copy_of(key, str(target), func)}:{func}" if isinstance(target, Path) else ref


def write_inputs(run_dir: Path, files: list[InputFile]) -> None:
    """Write the copies into `run_dir/inputs/`, read-only (0444: nothing should ever rewrite them)."""
    if not files:
        return
    folder = RunPaths(run_dir).inputs
    folder.mkdir(exist_ok=True)
    for item in files:
        path = folder / item.name
        if not path.exists():  # content-named: the same file named twice is one copy
            path.write_bytes(item.data)
            path.chmod(0o444)


def manifest_entries(spec: JobSpec, files: list[InputFile]) -> list[dict[str, str]]:
    """What the manifest says about the inputs: the copies, and the source files of module plugins."""
    out = [{"key": f.key, "source": f.source, "copy": f"{INPUTS}/{f.name}", "sha256": f.sha256} for f in files]
    for where, task in _tasks(spec):
        for i, ref in enumerate(getattr(task, "reward_funcs", None) or []):
            target = split_plugin_ref(ref, Path("/"))[0] if is_plugin_ref(ref) else None
            if not isinstance(target, str):
                continue  # a built-in, or a file (copied above)
            entry = {"key": f"{where}.reward_funcs[{i}]", "module": target}
            found = module_source(target)
            if isinstance(found, Path):
                with found.open("rb") as f:
                    entry.update(source=str(found), sha256=hashlib.sha256(f.read(MAX_INPUT_BYTES)).hexdigest())
            out.append(entry)
    return out


def import_plugins(spec: JobSpec, run_dir: Path, files: list[InputFile], spec_file: str) -> None:
    """Import every reward plugin as the nodes will: the copies in `run_dir`, and module plugins (submit may
    run user code; render never does).

    Raises:
        SpecError: with every plugin that fails to import or has a signature TRL cannot call.
    """
    from hpcqwen.rewards.plugins import check_reward

    refs = [(f.key, f"{RunPaths(run_dir).inputs / f.name}:{f.function}") for f in files if f.function]
    for where, task in _tasks(spec):
        refs += [(f"{where}.reward_funcs[{i}]", ref) for i, ref in enumerate(getattr(task, "reward_funcs", None) or [])
                 if is_plugin_ref(ref) and isinstance(split_plugin_ref(ref, Path("/"))[0], str)]
    issues = [SpecIssue(spec_file, None, key, f"{ref}: " + "; ".join(problems),
                        hint="see jobspecs/plugins/example_reward.py")
              for key, ref in refs if (problems := check_reward(ref, "/"))]
    if issues:
        raise SpecError(spec_file, issues)


def original_names(run_dir: Path) -> dict[str, str]:
    """Each copy's path -> the path the spec named, from the run dir's manifest, so that messages on the nodes
    name the user's file (empty when the manifest cannot be read: the copies' names are used then)."""
    import json

    try:
        entries = json.loads((RunPaths(run_dir).manifest).read_text(encoding="utf-8")).get("inputs") or []
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(run_dir / e["copy"]): str(e["source"]) for e in entries
            if isinstance(e, dict) and isinstance(e.get("copy"), str) and isinstance(e.get("source"), str)}


def _tasks(spec: JobSpec) -> list[tuple[str, Any]]:
    """(key prefix, task) of the job, or of each array task when the array overrides task keys."""
    if spec.array is None or not spec.array.tasks:
        return [("task", spec.task)]
    return [(f"array.tasks[{i}]", spec.task_for(i)) for i in range(spec.array.count)]
