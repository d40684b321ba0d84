"""What a run dir says about itself, read by every command that is given one (status, queue, cancel,
resume, merge, cost, evaluate): its manifest, and the state of a local-backend job. Reading only:
the run dir is written by `submit.py` (manifest) and `localrun.py` (a local job's files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcqwen.errors import RunDirError
from hpcqwen.paths import RunPaths
from hpcqwen.stopping import EXIT_STOPPED

MANIFEST_MAX_BYTES = 4 << 20  # a manifest is a few KB; a bigger one was not written by hpcqwen


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of a run dir (a JSON object of at most MANIFEST_MAX_BYTES), or a RunDirError naming it."""
    path = RunPaths(run_dir).manifest
    try:
        with open(path, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ValueError(f"larger than {MANIFEST_MAX_BYTES >> 20} MiB")
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise RunDirError(f"cannot read {path}: {str(e)[:200]}",
                          hint="give a run dir that `hpcqwen submit` printed") from None
    return data


def local_process(job_id: str, run_dir: Path) -> int | None:
    """The pid of a local run if that process is still this run's `hpcqwen.localrun` (a pid may
    since have been reused by another program: never signal that one), else None."""
    pid = job_id.removeprefix("local-")
    if not pid.isdigit():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in cmdline]
    if "hpcqwen.localrun" not in args or not any(Path(a) == run_dir for a in args if a.startswith("/")):
        return None
    return int(pid)


def local_status(paths: RunPaths, job_id: str) -> str:
    """RUNNING, COMPLETED, STOPPED, CANCELLED or FAILED for a local-backend job.

    The exit code decides once it is written (localrun may live a moment longer): a cancelled run
    that did not finish is CANCELLED; one that finished as it was cancelled is COMPLETED."""
    cancelled = paths.local_cancelled.exists()
    if paths.local_rc.exists():
        code = paths.local_rc.read_text().strip()
        return "CANCELLED" if cancelled and code != "0" else \
            {"0": "COMPLETED", str(EXIT_STOPPED): "STOPPED"}.get(code, "FAILED")
    if local_process(job_id, paths.root) is not None:
        return "RUNNING"
    return "CANCELLED" if cancelled else "FAILED"  # gone without writing an exit code
