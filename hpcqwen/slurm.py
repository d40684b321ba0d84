"""Thin wrappers over sbatch / squeue / sacct / scancel / scontrol, through one `run_cmd`.

Parsers read `--format` / `--parsable2` text (stable across Slurm versions, unlike --json), with
fields separated by ASCII's unit separator (0x1f), which no job name or path hpcqwen writes holds,
and the free-text fields (work dir, then job name) last, so `|`, spaces and unicode in other users'
names and paths cannot shift a field. A line that still does not parse (a newline in a job name
splits its row) is left out and counted (`JobRows.skipped`), never fatal for the other rows.
States go through one table (`SLURM_STATES`) to a 6-value `JobState`; an unknown state is
kept verbatim and shown, never a crash. `query_jobs` makes ONE squeue call for any number of
jobs and asks sacct only about the ones that left the queue.
"""

from __future__ import annotations

import enum
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hpcqwen.errors import ControllerUnreachable, SlurmCommandError

RunCmd = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


class JobState(str, enum.Enum):
    """Slurm's many states, folded into the six a user acts on."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    STOPPED = "STOPPED"  # saved a complete checkpoint and stopped without requeue: resumable
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job will not run again by itself."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.STOPPED)


SLURM_STATES: dict[str, JobState] = {
    **dict.fromkeys(["PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"],
                    JobState.PENDING),
    **dict.fromkeys(["RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SUSPENDED", "RESIZING",
                     "UPDATE_DB"], JobState.RUNNING),
    # hpcqwen's own (progress.refine_state): FAILED with exit 75 and a FINAL file. Slurm's rare STOPPED
    # (SIGSTOP sent to a job) reads the same; it is a terminal state here.
    "STOPPED": JobState.STOPPED,
    "HUNG": JobState.FAILED,  # hpcqwen's own: the hang watchdog ended the job (FINAL `HUNG ...`)
    "COMPLETED": JobState.SUCCEEDED,
    **dict.fromkeys(["FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                     "REVOKED"], JobState.FAILED),
    "CANCELLED": JobState.CANCELLED,
}

# Phrases Slurm clients print when no controller answers (22.05 .. 24.x).
_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Connection refused|Socket timed out|"
    r"Zero Bytes were transmitted|Could not establish a configuration source|Couldn't find the specified plugin|"
    r"slurm_load_partitions: Unable", re.I)


def run_cmd(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one Slurm client command; raise ControllerUnreachable when nothing answers."""
    try:
        # errors="replace": another user's job name in a non-UTF-8 encoding must not fail the whole answer
        proc = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout,
                              check=False)
    except FileNotFoundError:
        raise ControllerUnreachable(
            f"`{argv[0]}` is not installed on this machine", where=" ".join(argv),
            hint="run on a Slurm login node, start the local cluster (cluster/local/up), or use --backend local",
        ) from None
    except subprocess.TimeoutExpired:
        raise ControllerUnreachable(f"`{' '.join(argv)}` did not answer within {timeout:.0f} s",
                                    hint="the controller is overloaded or down; try again later") from None
    if proc.returncode != 0 and _UNREACHABLE.search(proc.stderr):
        raise ControllerUnreachable(
            f"the Slurm controller does not answer: {proc.stderr.strip().splitlines()[-1]}",
            where=" ".join(argv), hint="start it (cluster/local/up) or check `scontrol ping`; or use --backend local",
        )
    return proc


def _checked(argv: Sequence[str], run: RunCmd, timeout: float = 60.0, hint: str = "") -> str:
    proc = run(argv, timeout)
    if proc.returncode != 0:
        raise SlurmCommandError(argv, proc.returncode, proc.stderr or proc.stdout, hint=hint)
    return proc.stdout


# ---- submit / cancel / requeue / ping -----------------------------------------------------

def parse_sbatch(stdout: str) -> str:
    """`sbatch --parsable` prints `<jobid>` or `<jobid>;<cluster>`."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = line.split(";")[0]
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmCommandError(["sbatch", "--parsable"], 0, f'could not parse sbatch output "{stdout.strip()}"')
    return job_id


def sbatch(script: str, run: RunCmd = run_cmd) -> str:
    """Submit a batch script file; return the job id."""
    hint = "check the partition, account and resources against `sinfo` and your profile"
    return parse_sbatch(_checked(["sbatch", "--parsable", script], run, hint=hint))


def scancel(job_ids: Iterable[str], run: RunCmd = run_cmd) -> None:
    """Cancel jobs (array ids cancel the whole array)."""
    _checked(["scancel", *job_ids], run)


def ping(run: RunCmd = run_cmd) -> str | None:
    """`scontrol ping`: the controller's status line when it is UP, else None."""
    try:
        proc = run(["scontrol", "ping"], 15.0)
    except ControllerUnreachable:
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and "UP" in out else None


# ---- queries ------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobRow:
    """One job or array task as Slurm reports it."""

    job_id: str  # 123, or 123_4 for an array task
    array_job_id: str  # 123 for every task of array 123 (= job_id for plain jobs)
    array_task_id: int | None
    slurm_state: str  # verbatim (PENDING, RUNNING, NODE_FAIL, ...)
    reason: str
    name: str
    elapsed: str = ""
    time_limit: str = ""
    nodes: int = 0
    gres: str = ""
    work_dir: str = ""
    exit_code: str = ""
    source: str = "squeue"  # squeue | sacct
    user: str = ""
    nodelist: str = ""  # n[1-2]; the first host runs the batch script (node rank 0)
    dependency: str = ""  # squeue %E: afterok:123(unfulfilled), afterany:45_*(failed)

    @property
    def state(self) -> JobState:
        """The folded state (UNKNOWN for states the table does not know)."""
        return SLURM_STATES.get(self.slurm_state, JobState.UNKNOWN)


class JobRows(list[JobRow]):
    """Parsed rows, and the lines that were left out because they did not parse."""

    def __init__(self, rows: Iterable[JobRow] = (), skipped: Iterable[str] = ()) -> None:
        super().__init__(rows)
        self.skipped = list(skipped)


SEP = "\x1f"  # ASCII unit separator: not in hpcqwen's names and run dirs, nor in any sane path
# Free text last: the work dir, then the job name (which may even hold SEP: it takes the rest).
SQUEUE_FIELDS = ["%i", "%F", "%K", "%T", "%r", "%M", "%l", "%D", "%b", "%u", "%N", "%E", "%Z", "%j"]
SACCT_FIELDS = ["JobID", "JobIDRaw", "State", "ExitCode", "Elapsed", "Timelimit", "NNodes", "WorkDir", "JobName"]
_SQUEUE_ID = re.compile(r"\d+(_\d+)?")


def _task_id(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def parse_squeue(stdout: str) -> JobRows:
    """Rows of `squeue --noheader --array --format=<SQUEUE_FIELDS joined by SEP>`; lines that do not
    parse are counted in `skipped`."""
    rows, skipped = [], []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split(SEP, len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS) or not _SQUEUE_ID.fullmatch(parts[0].strip()):
            skipped.append(line)
            continue
        jid, array_jid, task, state, reason, elapsed, limit, nodes, gres, user, nodelist, dep = \
            (p.strip() for p in parts[:-2])
        rows.append(JobRow(jid, array_jid or jid, _task_id(task), state, "" if reason == "None" else reason,
                           parts[-1], elapsed, limit, int(nodes) if nodes.isdigit() else 0,
                           "" if gres == "N/A" else gres, parts[-2], user=user, nodelist=nodelist,
                           dependency="" if dep == "(null)" else dep))
    return JobRows(rows, skipped)


def parse_sacct(stdout: str) -> JobRows:
    """Rows of `sacct --noheader --parsable2 --delimiter=SEP -X --format=<SACCT_FIELDS>`; lines that do
    not parse are counted in `skipped`."""
    rows, skipped = [], []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split(SEP, len(SACCT_FIELDS) - 1)
        if len(parts) != len(SACCT_FIELDS) or not re.fullmatch(r"\d+([_+].+)?", parts[0]):
            skipped.append(line)
            continue
        jid, raw, state, exit_code, elapsed, limit, nodes, work_dir, name = parts
        array_jid, _, task = jid.partition("_")
        state_word = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0"
        rows.append(JobRow(jid, array_jid, _task_id(task), state_word, "", name, elapsed, limit,
                           int(nodes) if nodes.isdigit() else 0, "", work_dir, exit_code, source="sacct"))
    return JobRows(rows, skipped)


def squeue(job_ids: Sequence[str] | None = None, user: str | None = None, run: RunCmd = run_cmd) -> JobRows:
    """ONE squeue call: the given jobs (and their array tasks), or all jobs of `user`, or all."""
    # --states=all: finished jobs stay visible (for MinJobAge) with their final state, which
    # the default filter (pending/running/completing) would hide.
    argv = ["squeue", "--noheader", "--array", "--states=all", f"--format={SEP.join(SQUEUE_FIELDS)}"]
    if job_ids:
        argv.append(f"--jobs={','.join(job_ids)}")
    if user:
        argv.append(f"--user={user}")
    proc = run(argv, 30.0)
    if proc.returncode != 0:
        # One id that the controller forgot (older than MinJobAge) is an error, not an empty
        # list; with several ids squeue just leaves the unknown ones out.
        if "Invalid job id" in proc.stderr:
            return JobRows()
        raise SlurmCommandError(argv, proc.returncode, proc.stderr)
    return parse_squeue(proc.stdout)


def sacct(job_ids: Sequence[str], run: RunCmd = run_cmd) -> JobRows:
    """Accounting rows (allocations only) for jobs that left the queue."""
    argv = ["sacct", "--noheader", "--parsable2", f"--delimiter={SEP}", "-X", f"--format={','.join(SACCT_FIELDS)}",
            f"--jobs={','.join(job_ids)}"]
    proc = run(argv, 30.0)
    if proc.returncode != 0:
        if "accounting storage is disabled" in (proc.stderr + proc.stdout):
            return JobRows()
        raise SlurmCommandError(argv, proc.returncode, proc.stderr)
    return parse_sacct(proc.stdout)


def query_jobs(job_ids: Sequence[str], run: RunCmd = run_cmd) -> dict[str, list[JobRow]]:
    """Rows of each job (array ids give one row per task): one squeue call, plus one sacct
    call for the jobs squeue no longer knows."""
    found: dict[str, list[JobRow]] = {j: [] for j in job_ids}
    if not job_ids:
        return found
    for row in squeue(job_ids, run=run):
        found.setdefault(row.array_job_id if row.array_job_id in found else row.job_id, []).append(row)
    missing = [j for j, r in found.items() if not r]
    if missing:
        for row in sacct(missing, run=run):
            key = row.array_job_id if row.array_job_id in found else row.job_id
            if key in found:
                found[key].append(row)
    return found
