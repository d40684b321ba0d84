"""The local backend's child process: run the launcher for each task, then record the exit code.

`python -m hpcqwen.localrun RUN_DIR` runs `python -m hpcqwen launch RUN_DIR` once (or once per
array task, one after another, with SLURM_ARRAY_TASK_ID set as Slurm would) and writes the
first non-zero exit code, or 0, to logs/local.rc atomically.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hpcqwen.paths import RunPaths
from hpcqwen.spec import read_frozen_spec


def main(run_dir: str) -> int:
    """Run every task of the run dir here; return the first failure's exit code, or 0."""
    paths = RunPaths(Path(run_dir))
    spec = read_frozen_spec(paths.spec_json)
    indices: list[int | None] = list(range(spec.array.count)) if spec.array else [None]
    rc = 0
    for index in indices:
        env = dict(os.environ)
        env["HPCQWEN_JOB_ID"] = f"local-{os.getpid()}"
        if index is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(index)
        code = subprocess.call([sys.executable, "-m", "hpcqwen", "launch", str(paths.root)], env=env)
        rc = rc or code
    tmp = paths.local_rc.with_suffix(".tmp")
    tmp.write_text(f"{rc}\n")
    tmp.replace(paths.local_rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
