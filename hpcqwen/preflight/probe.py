"""`hpcqwen check --probe`: a tiny job that looks at the run root, cache root, model and data from a compute node.

The login node writes the paths to `<run_root>/.preflight/probe-<id>/request.json` (never onto a
command line), submits one 1-CPU job in the spec's partition and account that runs
`python -m hpcqwen.preflight.probe DIR`, and waits for `result.json`; the report gives each path's
verdict and the latency (queued, then running). The probe folder is removed afterwards; a probe that
does not start in time is cancelled and reported as a warning (the queue, not the spec, is slow).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcqwen import fs, slurm, slurminfo
from hpcqwen.data.formats import split_dataset_ref
from hpcqwen.preflight.report import Report
from hpcqwen.spec import JobSpec
from hpcqwen.stagerefs import is_stage_ref
from hpcqwen.tasks._common import is_hub_id

PROBE_DIR = ".preflight"


def probe_paths(spec: JobSpec) -> dict[str, tuple[str, str]]:
    """{label: (path, "write" | "read")} of what the job needs on the nodes."""
    out = {"cluster.run_root": (spec.cluster.run_root, "write")}
    if spec.cluster.cache_root:
        out["cluster.cache_root"] = (spec.cluster.cache_root, "write")
    task = spec.task
    for key in ("model", "load", "adapters"):
        value = getattr(task, key, None)
        if isinstance(value, str) and not is_hub_id(value) and not is_stage_ref(value):
            out[f"task.{key}"] = (value, "read")
    for key in ("dataset", "val_dataset"):
        for i, ref in enumerate(getattr(task, key, None) or []):
            path = split_dataset_ref(ref)[0]
            if not is_hub_id(path) and not is_stage_ref(path):
                out[f"task.{key}[{i}]"] = (path, "read")
    return out


def run_probe(spec: JobSpec, report: Report, *, timeout_s: float = 120.0, run: slurm.RunCmd = slurm.run_cmd) -> None:
    """Submit the probe, wait for its answer, put the verdicts into `report`."""
    folder = Path(spec.cluster.run_root) / PROBE_DIR / f"probe-{int(time.time())}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    try:
        fs.write_json_atomic(folder / "request.json", {k: list(v) for k, v in probe_paths(spec).items()})
        started = time.monotonic()
        job = slurminfo.sbatch_options(_sbatch_argv(spec, folder), run=run)
        result = _wait(folder / "result.json", timeout_s)
        if result is None:
            slurm.scancel([job], run=run)
            report.warn("cluster", f"the probe job {job} did not answer within {timeout_s:.0f} s (cancelled): the "
                        "paths were not checked from a compute node", hint="raise --probe-timeout, or check `squeue`")
            return
        _record(result, time.monotonic() - started, job, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sbatch_argv(spec: JobSpec, folder: Path) -> list[str]:
    r, c = spec.resources, spec.cluster
    python = shlex.quote(c.python or sys.executable)
    command = "; ".join([*c.setup, f"exec {python} -m hpcqwen.preflight.probe {shlex.quote(str(folder))}"])
    argv = ["--job-name=hpcqwen-probe", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=5",
            f"--output={folder}/probe.out", f"--chdir={folder}"]
    for key in ("partition", "account", "qos"):
        value = getattr(r, key) or getattr(c, key)
        if value:
            argv.append(f"--{key}={value}")
    return [*argv, f"--wrap={command}"]


def _wait(path: Path, timeout_s: float) -> dict[str, Any] | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        data = fs.read_json(path)
        if isinstance(data, dict):
            return data
        time.sleep(0.5)
    return None


def _record(result: dict[str, Any], latency_s: float, job: str, report: Report) -> None:
    ran = float(result.get("finished", 0) - result.get("started", 0))
    where = f"from {result.get('host', '?')} (job {job}: {latency_s:.1f} s from sbatch to answer, {ran:.2f} s running)"
    bad = {k: v for k, v in (result.get("paths") or {}).items() if v != "ok"}
    for key, why in bad.items():
        report.error(key, f"is not usable from a compute node {where}: {why}",
                     hint="put it on the filesystem every node mounts")
    if not bad:
        report.ok(f"probe: {len(result.get('paths') or {})} paths usable {where}")


# ---- on the node --------------------------------------------------------------------------------

def check_path(path: str, mode: str) -> str:
    """`ok`, or what is wrong with `path` for `mode` (read: exists and readable; write: a file can be made)."""
    p = Path(path)
    if mode == "write":
        base = next((q for q in (p, *p.parents) if q.exists()), None)
        if base is None or not base.is_dir():
            return "no existing parent folder"
        try:
            with tempfile.NamedTemporaryFile(dir=base, prefix=".hpcqwen-probe-"):
                pass
        except OSError as e:
            return f"cannot write in {base}: {e.strerror}"
        return "ok"
    if not p.exists():
        return "not found"
    if not os.access(p, os.R_OK):
        return "not readable"
    return "ok"


def main(folder: str) -> int:
    """Answer the request in FOLDER (run by the probe job)."""
    start = time.time()
    request = json.loads((Path(folder) / "request.json").read_text(encoding="utf-8"))
    paths = {key: check_path(str(path), str(mode)) for key, (path, mode) in request.items()}
    fs.write_json_atomic(Path(folder) / "result.json", {"host": socket.gethostname(), "started": start,
                                                       "finished": time.time(), "paths": paths})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
