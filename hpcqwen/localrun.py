"""The local backend's child process: the batch script's part, on this machine.

`python -m hpcqwen.localrun RUN_DIR` runs `python -m hpcqwen launch RUN_DIR` once (or once per
array task, one after another, with SLURM_ARRAY_TASK_ID set as Slurm would), clearing each task's
previous attempt first, and writes the run's exit code to logs/local.rc atomically: 0 when every
task finished, 75 when one stopped (saved, resumable with `hpcqwen resume`), else the first
failure's. There is no requeue here. A stop signal (SIGTERM from `hpcqwen cancel`, which signals
the whole process group) lets the running task save and stop, and no further task starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from hpcqwen import fs
from hpcqwen.paths import RunPaths
from hpcqwen.requeue import clear_attempt, decide, read_outcome
from hpcqwen.spec import read_frozen_spec
from hpcqwen.stopping import ignore_at_exit
from hpcqwen.supervisor import STOP_SIGNALS, die_with_parent, exit_code

_stopping: list[str] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stopping.append(signal.Signals(signum).name)  # the launcher (same process group) got it too


def main(run_dir: str) -> int:
    """Run every task of the run dir here; return the run's exit code (0, 75 or a failure's)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    ignore_at_exit(STOP_SIGNALS)
    paths = RunPaths(Path(run_dir))
    spec = read_frozen_spec(paths.spec_json)
    for stale in (paths.local_rc, paths.local_cancelled):
        stale.unlink(missing_ok=True)
    indices: list[int | None] = list(range(spec.array.count)) if spec.array else [None]
    rc = 0
    for index in indices:
        task = paths.task(index)
        if read_outcome(task) == "done":
            continue  # finished in an earlier attempt (`hpcqwen resume` reruns only the rest)
        if _stopping:
            break
        clear_attempt(task)
        env = dict(os.environ)
        env["HPCQWEN_JOB_ID"] = f"local-{os.getpid()}"
        if index is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(index)
        proc = subprocess.Popen([sys.executable, "-m", "hpcqwen", "launch", str(paths.root)], env=env,
                                preexec_fn=die_with_parent)  # noqa: PLW1509
        code = exit_code(proc.wait())
        d = decide(read_outcome(task), code, 0, 0, enabled=False, on_failure=False, progress=False)
        if d.final:
            how = _stopping[0] if _stopping else "STOP"
            why = "cancelled" if paths.local_cancelled.exists() else f"stopped by {how}"
            fs.write_atomic(task.final, f"STOPPED {why} (the local backend does not requeue; continue with "
                            f"`hpcqwen resume {paths.root}`)\n")
        rc = rc or d.exit_code
    fs.write_atomic(paths.local_rc, f"{rc}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
