"""What the watchdog does about a hang: requeue (without the suspect node), cancel, or only report.

- requeue, while `requeue.enabled` and `SLURM_RESTART_COUNT < requeue.max_restarts` (the batch script's
  rule and count): OUTCOME `requeued ...` is written first (the batch script then exits 0 and never
  requeues a second time), then `scontrol requeue`. Slurm refuses `ExcNodeList` for a running job ("Job
  is no longer pending execution", checked on Slurm 22.05), and a job that requeues itself is torn down
  before it could change it, so with a suspect node the job is requeued HELD (`scontrol requeuehold`) and a
  one-CPU helper job (`python -m hpcqwen.exclude JOB NODES`) adds the node to ExcNodeList once the job is
  pending and releases it; if the helper cannot be submitted, the job is requeued without exclusion.
- cancel (also when no restart remains, requeue is off, or outside Slurm): FINAL `HUNG <why>; report: …`
  and OUTCOME `hung ...` are written, then `scancel`; the run reads HUNG, not COMPLETED or FAILED.
- report: nothing beyond the report (the job runs on; the collective timeout is then the backstop).
Either way the ranks of every node are then killed (`hangs/.kill.json`, polled by every launcher): a hung
collective cannot end cleanly, so nothing is saved; the attempt resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcqwen import fs, stacks
from hpcqwen.fields import JOB_ID_RE
from hpcqwen.paths import TaskPaths

if TYPE_CHECKING:
    from hpcqwen.watchconfig import Layout, Verdict, WatchConfig

NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a Slurm node, partition, account or QOS name


@dataclass(frozen=True)
class Action:
    """The planned reaction to a hang."""

    kind: str  # requeue | cancel | report
    why: str = ""  # why cancel (or report) rather than requeue
    exclude: tuple[str, ...] = ()
    restart: int = 0
    max_restarts: int = 0

    def describe(self) -> str:
        """One sentence for the report and the log."""
        if self.kind == "report":
            return f"none: {self.why}."
        if self.kind == "cancel":
            return f"the job was cancelled ({self.why}); its state reads HUNG."
        nodes = f" with node {', '.join(self.exclude)} excluded" if self.exclude else " (no node excluded)"
        return f"requeued{nodes} (restart {self.restart + 1} of {self.max_restarts}); the next attempt resumes " \
               "from the newest complete checkpoint."


def plan(cfg: WatchConfig, layout: Layout, bad: list[str]) -> Action:
    """Pure: requeue, cancel or report, by on_hang, the restart count and whether Slurm runs the job."""
    if cfg.on_hang == "report":
        return Action("report", "on_hang: report, the job runs on")
    why = ("on_hang: cancel" if cfg.on_hang == "cancel" else "not under Slurm: nothing can requeue it"
           if not layout.slurm_job else "requeue is off" if not cfg.requeue_enabled
           else f"restart limit reached ({layout.restart} of {cfg.max_restarts})"
           if layout.restart >= cfg.max_restarts else "")
    if why:
        return Action("cancel", why)
    return Action("requeue", exclude=tuple(n for n in bad if NODE_RE.fullmatch(n)), restart=layout.restart,
                  max_restarts=cfg.max_restarts)


def carry_out(action: Action, task: TaskPaths, layout: Layout, verdict: Verdict, report: Path,
              kill_local: Callable[[], None]) -> str | None:
    """Do it; returns the OUTCOME line written (None for report)."""
    if action.kind == "report":
        return None
    line = f"{verdict.kind.replace(' ', '-')} restart={layout.restart} exclude={','.join(action.exclude) or '-'} " \
           f"report={report} time={int(time.time())}\n"
    if action.kind == "requeue":
        fs.write_atomic(task.outcome, "requeued " + line)
        err = requeue(layout.slurm_job, action.exclude, report.parent)
        if err is None:
            kill_everywhere(task, layout, kill_local)
            return "requeued " + line
        action = Action("cancel", f"requeue refused: {err}")
        print(f"hpcqwen watchdog: {action.describe()}", flush=True)
    fs.write_atomic(task.final, f"HUNG {verdict.kind}: {action.why}; report: {report}\n")
    fs.write_atomic(task.outcome, "hung " + line)
    if layout.slurm_job:
        _run(["scancel", layout.slurm_job])
    kill_everywhere(task, layout, kill_local)
    return "hung " + line


def kill_everywhere(task: TaskPaths, layout: Layout, kill_local: Callable[[], None]) -> None:
    """Every launcher kills its ranks (they poll hangs/.kill.json); this node's at once."""
    fs.write_json_atomic(task.hangs / stacks.KILL, {"job_id": layout.job_id, "restart": layout.restart},
                         durable=False)
    kill_local()


def _run(argv: list[str], env: dict[str, str] | None = None) -> str | None:
    """Run a Slurm command; None when it succeeded, else its error text."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if out.returncode == 0 else " ".join((out.stderr or out.stdout).split())[:300] or f"rc {out.returncode}"


def requeue(job: str, exclude: tuple[str, ...], log_dir: Path) -> str | None:
    """`scontrol requeue` (held, with the exclusion helper submitted, when nodes are to be excluded)."""
    if not JOB_ID_RE.fullmatch(job):
        return f"not a Slurm job id: {job[:40]!r}"
    helper = submit_helper(job, exclude, log_dir) if exclude else None
    if exclude and helper is not None:
        print(f"hpcqwen watchdog: could not submit the exclusion helper ({helper}); requeueing without "
              "excluding a node", flush=True)
    held = bool(exclude) and helper is None
    return _run(["scontrol", "requeuehold" if held else "requeue", job])


def submit_helper(job: str, nodes: tuple[str, ...], log_dir: Path) -> str | None:
    """Submit `python -m hpcqwen.exclude JOB NODES` as a one-CPU job; None on success, else the error."""
    opts = [f"--{key}={os.environ[var]}" for key, var in (("partition", "SLURM_JOB_PARTITION"),
            ("account", "SLURM_JOB_ACCOUNT"), ("qos", "SLURM_JOB_QOS"))
            if NODE_RE.fullmatch(os.environ.get(var, ""))]
    argv = ["sbatch", "--parsable", f"--job-name=hpcqwen-exclude-{job}", "--ntasks=1", "--cpus-per-task=1",
            "--mem=512M", "--time=00:20:00", f"--chdir={log_dir}", f"--output={log_dir}/exclude-%j.out", *opts,
            "--wrap", shlex.join([sys.executable, "-m", "hpcqwen.exclude", job, ",".join(nodes)])]
    # A batch job inherits SLURM_* of this job through sbatch's environment otherwise (nodes, tasks, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"}
    return _run(argv, env)
