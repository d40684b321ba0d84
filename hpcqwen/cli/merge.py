"""`hpcqwen merge RUN_DIR [--resubmit]`: write a distill run's result_path from its shards.

The last array task to finish merges by itself; this command is for afterwards (a shard that was
resubmitted by hand, a merge that was interrupted). It only reads the shard files, so it is cheap
and idempotent. With unfinished shards it names them; `--resubmit` then runs exactly their array
tasks again: it renders a new script for them, `RUN_DIR/job-resubmit-<n>.sbatch` (the spec's array
throttle kept; no `--dependency`, since the original's has been dealt with), and submits it through
the Slurm backend. The tasks skip every id already written, and the last of them merges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcqwen import slurm, submit
from hpcqwen.backends import SlurmBackend
from hpcqwen.errors import RunDirError
from hpcqwen.fs import write_atomic
from hpcqwen.paths import RunPaths, is_run_dir
from hpcqwen.rundir import read_manifest
from hpcqwen.shards import ShardFile, array_indices, incomplete_shards, merge_shards, shard_file
from hpcqwen.spec import JobSpec, read_frozen_spec
from hpcqwen.tasks.distill import DistillTask


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR [--resubmit]."""
    p.add_argument("run_dir", help="run dir of a distill job (printed by `hpcqwen submit`)")
    p.add_argument("--resubmit", action="store_true",
                   help="if shards are unfinished, submit their array tasks again instead of failing")


def resubmit(run_dir: Path, spec: JobSpec, shards: list[int], run: slurm.RunCmd = slurm.run_cmd) -> str:
    """Submit the array tasks owning `shards` again (`hpcqwen.submit.resubmit`); returns the job id.

    Raises:
        RunDirError: When the run did not go to Slurm.
        SlurmCommandError: When sbatch refuses (the new script is removed again).
    """
    info = read_manifest(run_dir)
    if info.get("backend") != "slurm":
        raise RunDirError(f"{run_dir} ran on the {info.get('backend')} backend; --resubmit needs Slurm",
                          hint="submit the spec again (finished shards are in this run dir only)")
    tasks = array_indices(shards, spec.array.count) if spec.array else None
    sub = submit.resubmit(run_dir, SlurmBackend(run=run), tasks)
    manifest = read_manifest(run_dir)
    manifest["resubmits"][-1]["shards"] = shards
    write_atomic(RunPaths(run_dir).manifest, json.dumps(manifest, indent=2) + "\n")
    return sub.job_ids[0]


def run(args: argparse.Namespace) -> int:
    """Merge, or report (and with --resubmit, rerun) the unfinished shards."""
    run_dir = Path(args.run_dir).expanduser().resolve()
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not an hpcqwen run dir (no spec.json)",
                          hint="give the run dir that `hpcqwen submit` printed")
    spec = read_frozen_spec(RunPaths(run_dir).spec_json)
    task = spec.task
    if not isinstance(task, DistillTask):
        raise RunDirError(f"{run_dir} is a {task.kind} run; merge applies to task.kind: distill")
    missing = incomplete_shards(run_dir, task.shards)
    if missing and args.resubmit:
        written = {s: len(ShardFile(shard_file(run_dir, s)).read()) for s in missing}
        job = resubmit(run_dir, spec, missing)
        print(f"resubmitted shards {missing} (prompts already written: {written}) as job {job}; "
              "its last task merges")
        return 0
    result = merge_shards(run_dir, task.shards, task.num_return_sequences, task.result_file(run_dir))
    print(f"merged {result.rows} rows ({result.prompts} prompts × {task.num_return_sequences} answers, "
          f"{result.skipped} prompts skipped as too long) from {task.shards} shards into {result.path}")
    return 0
