"""`python -m hpcqwen.exclude JOB NODES`: the watchdog's helper job that keeps a bad node out of a requeue.

Slurm accepts `ExcNodeList` only for a pending job, so the watchdog requeues a hung job held
(`scontrol requeuehold`) and submits this as a one-CPU job: it waits until JOB is pending, adds NODES
(comma-separated) to its ExcNodeList, and releases it — always, also when the update failed, so the
job never stays held because of this helper.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from hpcqwen.fields import JOB_ID_RE
from hpcqwen.hangaction import NODE_RE

WAIT_S = 900.0


def scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    """One scontrol call (never raises)."""
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(["scontrol", *args], 1, "", str(e))


def field(text: str, name: str) -> str:
    """A `Name=value` field of `scontrol show job` ('' when absent or (null))."""
    m = re.search(rf"\b{name}=(\S*)", text)
    return "" if m is None or m.group(1) == "(null)" else m.group(1)


def exclude(job: str, nodes: list[str], wait_s: float = WAIT_S) -> int:
    """Wait for `job` to be pending, add `nodes` to its ExcNodeList, release it; 0 when the update took."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        show = scontrol("show", "job", job).stdout
        state = field(show, "JobState")
        if state in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT") or not show:
            print(f"exclude: job {job} is {state or 'gone'}; nothing to do", flush=True)
            return 1
        if state in ("PENDING", "REQUEUE_HOLD"):
            wanted = ",".join(keep_runnable(show, nodes, partition_nodes(field(show, "Partition").split(",")[0])))
            if not wanted:
                print(f"exclude: excluding {','.join(nodes)} would leave job {job} too few nodes; not excluded")
                return release(job, 1)
            out = scontrol("update", f"JobId={job}", f"ExcNodeList={wanted}")
            if out.returncode == 0:
                print(f"exclude: job {job}: ExcNodeList={wanted}", flush=True)
                return release(job, 0)
        time.sleep(1.0)
    print(f"exclude: job {job} did not become pending within {wait_s:.0f} s", flush=True)
    return release(job, 1)


def keep_runnable(show: str, nodes: list[str], total: int | None) -> list[str]:
    """Pure: the job's excluded nodes plus `nodes`, as long as its partition (`total` nodes) keeps enough for it;
    else only `nodes` (an older exclusion is dropped); else none (a job that can never start is worse)."""
    current = [n for n in field(show, "ExcNodeList").split(",") if n]
    needed = int(field(show, "NumNodes").split("-")[0] or 1)
    for candidate in (list(dict.fromkeys(current + nodes)), nodes):
        if total is None or total - len(candidate) >= needed:
            return candidate
    return []


def partition_nodes(partition: str) -> int | None:
    """TotalNodes of a partition (None when it cannot be read)."""
    m = re.search(r"\bTotalNodes=(\d+)", scontrol("show", "partition", partition).stdout) if partition else None
    return int(m.group(1)) if m else None


def release(job: str, code: int) -> int:
    """Release the held job (it may not be held: then scontrol says so, which is fine)."""
    out = scontrol("release", job)
    print(f"exclude: released {job} (rc {out.returncode} {out.stderr.strip()})", flush=True)
    return code


def main(argv: list[str]) -> int:
    """Check the arguments (they came from the watchdog, but are checked anyway), then `exclude`."""
    if len(argv) != 2 or not JOB_ID_RE.fullmatch(argv[0]):
        print("usage: python -m hpcqwen.exclude JOB NODE[,NODE...]", file=sys.stderr)
        return 2
    nodes = [n for n in argv[1].split(",") if n]
    if not nodes or not all(NODE_RE.fullmatch(n) for n in nodes):
        print(f"exclude: bad node list {argv[1][:80]!r}", file=sys.stderr)
        return 2
    return exclude(argv[0], nodes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
