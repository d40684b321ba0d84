"""A stage's outputs, and the resolution of `${stages...}` on the node when a stage starts.

`resolve_on_node(run_dir)` is called by the launcher before it reads `spec.json`: when the spec holds
references, node 0 (under a lock on the run dir: the tasks of an array share one spec.json) reads
the pipeline's record, computes each output from its producer's run dir, writes the resolved
`spec.json` atomically (the unresolved one is kept as `spec.unresolved.json`) and the values as
`inputs.json`; the other nodes wait until spec.json holds no reference. Outputs:
- `run_dir`: the producer's run dir;
- `result_path`: a distill stage's merged dataset (it must exist);
- `checkpoint`: the newest complete checkpoint (SFT/GRPO `checkpoint-<n>`, Megatron `iter_<n>`);
- `export`: a Hugging Face model of that checkpoint, `<producer>/exports/<checkpoint>-merged` (LoRA
  merged into its base) or `-hf` (Megatron converted), written here on first use.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from hpcqwen import fs, stagerefs
from hpcqwen.errors import HpcqwenError
from hpcqwen.paths import RunPaths
from hpcqwen.pipeline.record import pipeline_dir_of, read_record

UNRESOLVED = "spec.unresolved.json"
INPUTS = "inputs.json"
WAIT_S = 3600.0  # an export of a large model may take a while on node 0


class StageReferenceError(HpcqwenError):
    """A reference that cannot be resolved when the stage starts (its producer left no such output)."""

    reference = "pipeline"


def output_value(run_dir: Path, output: str) -> str:
    """The value of `output` of the stage whose run dir is `run_dir` (see the module docstring)."""
    from hpcqwen import export
    from hpcqwen.spec import read_frozen_spec
    from hpcqwen.tasks.distill import DistillTask

    if output == "run_dir":
        return str(run_dir)
    if output == "result_path":
        task = read_frozen_spec(RunPaths(run_dir).spec_json).task
        path = task.result_file(run_dir) if isinstance(task, DistillTask) else None
        if path is None or not path.is_file():
            raise StageReferenceError(f"stage run {run_dir} has no merged dataset ({path})",
                                  hint=f"run `hpcqwen merge {run_dir}`, then `hpcqwen pipeline resume`")
        return str(path)
    ckpt = export.resolve_megatron_checkpoint(run_dir) or export.resolve_checkpoint(run_dir)
    if output == "checkpoint":
        return str(ckpt)
    return str(ensure_export(run_dir, ckpt))


def ensure_export(run_dir: Path, ckpt: Path) -> Path:
    """`<run_dir>/exports/<checkpoint>-merged` (or `-hf`), written once: a unique temp folder, then a rename."""
    from hpcqwen import export

    megatron = export.resolve_megatron_checkpoint(run_dir) is not None
    out = run_dir / "exports" / f"{ckpt.name}-{'hf' if megatron else 'merged'}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    if megatron:
        export.export_megatron(ckpt, tmp)
    else:
        export.export_checkpoint(ckpt, tmp, merge_lora=True)
    try:
        tmp.rename(out)
    except OSError:  # another launcher exported it first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hpcqwen pipeline: exported {ckpt} -> {out}", flush=True)
    return out


def resolve_on_node(run_dir: Path, environ: Mapping[str, str] = os.environ) -> None:
    """Resolve the stage's references into spec.json (node 0), or wait for node 0 to have done it."""
    paths = RunPaths(run_dir)
    if stagerefs.PREFIX not in paths.spec_json.read_text(encoding="utf-8"):
        return
    if environ.get("SLURM_NODEID", "0") != "0":
        _wait_resolved(paths)
        return
    with open(run_dir / ".resolve.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = paths.spec_json.read_text(encoding="utf-8")
        if stagerefs.PREFIX in text:
            _resolve(paths, text)


def _resolve(paths: RunPaths, text: str) -> None:
    from hpcqwen.spec import JobSpec

    pdir = pipeline_dir_of(paths.root)
    if pdir is None:
        raise StageReferenceError(f"{paths.root} holds ${{stages...}} references but is not a stage of a pipeline dir",
                              hint="submit it with `hpcqwen pipeline submit`")
    record = read_record(pdir)
    values: dict[str, str] = {}

    def value_of(stage: str, output: str) -> str:
        key = f"${{stages.{stage}.{output}}}"
        if key not in values:
            if stage not in record.stages:
                raise StageReferenceError(f"{key}: the pipeline has no stage {stage!r}")
            values[key] = output_value(Path(record.stages[stage].run_dir), output)
        return values[key]

    data = stagerefs.substitute(json.loads(text), value_of)
    resolved = JobSpec.model_validate(data)  # the same checks a frozen spec gets on every node
    fs.write_atomic(paths.root / UNRESOLVED, text)
    fs.write_json_atomic(paths.root / INPUTS, values)
    fs.write_atomic(paths.spec_json, resolved.model_dump_json(indent=2) + "\n")
    for key, value in values.items():
        print(f"hpcqwen pipeline: {key} = {value}", flush=True)


def _wait_resolved(paths: RunPaths) -> None:
    end = time.monotonic() + WAIT_S
    while stagerefs.PREFIX in paths.spec_json.read_text(encoding="utf-8"):
        if time.monotonic() > end:
            raise StageReferenceError(f"node 0 did not resolve the references of {paths.spec_json} within "
                                      f"{WAIT_S:.0f} s", hint="see node 0's log lines")
        time.sleep(1.0)
