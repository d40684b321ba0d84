"""The end of an attempt: finished, requeued, or stopped — decided by the outcome, not by the signal.

The rule (the batch template `templates/sbatch.sh.j2` writes it in bash; `decide` is the same rule in
Python for the submitit backend, and tests/unit/test_requeue.py checks that both agree on every case):
- the launcher exited 0 and node 0 wrote OUTCOME `done`  -> exit 0 (Slurm: COMPLETED);
- OUTCOME `stopped` (the ranks saved a complete checkpoint)  -> requeue while restarts remain;
  otherwise exit 75 and write FINAL `STOPPED <why>` (restart limit, requeue refused, requeue off);
- anything else is a failure -> requeue when `requeue.on_failure`, the attempt got past its first
  step (TASK_DIR/PROGRESS) and restarts remain; otherwise exit with the failure's code;
- OUTCOME `requeued` (the hang watchdog requeued the job itself, `hpcqwen.hangaction`) -> exit 0, never a
  second requeue; OUTCOME `hung` (the watchdog ended the job and wrote FINAL `HUNG ...`) -> exit with the
  launcher's code, no requeue.
A requeue is asked for only while Slurm still says the job is RUNNING: after `scancel` the job is
COMPLETING, and `scontrol requeue` would bring a cancelled job back (it does, in Slurm 22.05).
`SubmititLaunch` is what the submitit backend runs on every node: the launcher as a child process,
then (node 0) this rule, in place of submitit's own USR2 handler, which requeues at once while the
ranks are still saving and refuses to requeue a command ("not checkpointable").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hpcqwen import fs
from hpcqwen.paths import RunPaths, TaskPaths
from hpcqwen.stopping import EXIT_STOPPED, ignore_at_exit
from hpcqwen.supervisor import die_with_parent, exit_code


@dataclass(frozen=True)
class Decision:
    """What to do at the end of an attempt."""

    requeue: bool
    exit_code: int
    final: str | None = None  # FINAL's line when a resumable run ends without requeue


def read_outcome(task: TaskPaths) -> str:
    """done | stopped | requeued | hung | failed (a missing or unreadable OUTCOME is a failure)."""
    try:
        words = task.outcome.read_text(encoding="utf-8").split()
    except OSError:
        return "failed"
    return words[0] if words and words[0] in ("done", "stopped", "requeued", "hung") else "failed"


def decide(outcome: str, rc: int, restarts: int, max_restarts: int, *, enabled: bool, on_failure: bool,
           progress: bool) -> Decision:
    """The rule above, before any requeue was tried (a refused requeue then ends as `refused`)."""
    if rc != 0 and outcome in ("done", "stopped"):
        outcome = "failed"
    if outcome in ("done", "requeued"):
        return Decision(False, 0)
    code = EXIT_STOPPED if outcome == "stopped" else (rc or 1)
    eligible = enabled and (outcome == "stopped" or (on_failure and progress and outcome == "failed"))
    if eligible and restarts < max_restarts:
        return Decision(True, 0)
    if outcome != "stopped":
        return Decision(False, code)
    why = f"restart limit reached ({restarts} of {max_restarts})" if enabled else "requeue is off"
    return Decision(False, code, f"STOPPED {why}")


def not_running(outcome: str, rc: int, state: str) -> Decision:
    """No requeue: Slurm no longer runs the job (cancelled, timed out, or requeued by Slurm itself)."""
    return refused(outcome, rc, f"the job is {state} (cancelled, timed out or requeued by Slurm)", prefix="")


def refused(outcome: str, rc: int, err: str, prefix: str = "requeue refused: ") -> Decision:
    """A requeue that `scontrol` refused (a cancelled job, a partition that forbids it)."""
    if outcome == "stopped" and rc == 0:
        return Decision(False, EXIT_STOPPED, "STOPPED " + prefix + " ".join(err.split()))
    return Decision(False, rc or 1)


def job_state(job: str) -> str:
    """`scontrol show job`'s JobState (RUNNING, COMPLETING, ...), or '' when it cannot be read."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"JobState=([A-Z_]+)", out)
    return m.group(1) if m else ""


def clear_attempt(task: TaskPaths) -> None:
    """Remove the previous attempt's STOP, OUTCOME, FINAL and PROGRESS (the batch script does the same)."""
    for path in (task.stop, task.outcome, task.final, task.progress):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass
class SubmititLaunch:
    """The submitit backend's job function: `launcher_argv` on every node, then the rule on node 0."""

    launcher_argv: list[str]
    run_dir: str
    array_index: int | None  # this task's index in the spec's array (submitit numbers its own 0..k-1)
    max_restarts: int
    enabled: bool
    on_failure: bool

    def __call__(self) -> None:
        task = RunPaths(Path(self.run_dir)).task(self.array_index)
        node0 = os.environ.get("SLURM_NODEID", "0") == "0"
        if node0:
            clear_attempt(task)
        env = dict(os.environ)
        if self.array_index is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(self.array_index)
        proc = subprocess.Popen(self.launcher_argv, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509

        def on_signal(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(OSError):
                task.stop.touch()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        for sig in (signal.SIGUSR2, signal.SIGTERM):  # replaces submitit's handlers (see the module docstring)
            signal.signal(sig, on_signal)
        ignore_at_exit((signal.SIGUSR2, signal.SIGTERM))
        rc = exit_code(proc.wait())
        if not node0:
            if rc != 0:
                raise RuntimeError(f"hpcqwen launcher exited with {rc}")
            return
        self.finish(task, rc)

    def finish(self, task: TaskPaths, rc: int) -> None:
        """Node 0: requeue, stop (exit 75), fail (raise) or return (done)."""
        outcome = read_outcome(task)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        d = decide(outcome, rc, restarts, self.max_restarts, enabled=self.enabled, on_failure=self.on_failure,
                   progress=task.progress.exists())
        if d.requeue:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
            state = job_state(job)
            if state and state != "RUNNING":
                d = not_running(outcome, rc, state)
            else:
                proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
                if proc.returncode == 0:
                    print(f"hpcqwen: {outcome}; requeued {job} (restart {restarts + 1} of {self.max_restarts})",
                          file=sys.stderr, flush=True)
                    sys.exit(0)
                d = refused(outcome, rc, proc.stderr or proc.stdout)
        if d.final:
            fs.write_atomic(task.final, d.final + "\n")
            print(f"hpcqwen: stopped and not requeued: {d.final.removeprefix('STOPPED ')}", file=sys.stderr,
                  flush=True)
        if d.exit_code == EXIT_STOPPED:
            sys.exit(EXIT_STOPPED)  # SystemExit passes submitit's `except Exception`: the job ends 75
        if d.exit_code:
            raise RuntimeError(f"hpcqwen: the run failed (launcher exit code {rc}); see the log above")
