"""Parsers over recorded Slurm 22.05 output (arrays, dependencies, odd states), and the call budget."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from hpcqwen import slurm
from hpcqwen.errors import ControllerUnreachable, SlurmCommandError
from hpcqwen.slurm import JobState

# squeue --noheader --array --states=all --format=%i|%F|%K|%T|%r|%M|%l|%D|%b|%u|%N|%E|%Z|%j, recorded on
# cluster/local (with `|` as separator for legibility: hpcqwen asks for SEP, 0x1f, and `|` here is replaced)
SQUEUE = """\
2_2|2|2|PENDING|JobArrayTaskLimit|0:00|UNLIMITED|1|N/A|root||(null)|/tmp|wrap
3|3|N/A|PENDING|Dependency|0:00|UNLIMITED|1|N/A|root||afterok:2_*(unfulfilled)|/tmp|wrap
2_0|2|0|RUNNING|None|0:01|365-00:00:00|1|N/A|root|n1|(null)|/tmp|wrap
4|4|N/A|COMPLETED|None|0:04|10:00|2|gres:gpu:2|root|n[1-2]|(null)|/runs/a b|name
5|5|N/A|BRAND_NEW_STATE|None|0:04|10:00|1|N/A|root|n1|(null)|/tmp|odd
""".replace("|", slurm.SEP)
# sacct --noheader --parsable2 --delimiter=SEP -X
#   --format=JobID,JobIDRaw,State,ExitCode,Elapsed,Timelimit,NNodes,WorkDir,JobName (same legibility)
SACCT = """\
1|1|COMPLETED|0:0|00:00:04|00:10:00|2|/tmp/hq-runs/allreduce-2node/20261128T030559Z-0f94e9|allreduce-2node
2_0|4|COMPLETED|0:0|00:00:04|365-00:00:00|1|/tmp|wrap
3|3|CANCELLED by 0|0:0|00:00:00|Partition_Limit|1|/tmp|wrap
7|7|TIMEOUT|0:15|00:01:09|00:01:00|1|/tmp|t
8|8|NODE_FAIL|1:0|00:00:09|00:01:00|1|/tmp|t
""".replace("|", slurm.SEP)


def test_parse_squeue() -> None:
    rows = slurm.parse_squeue(SQUEUE)
    assert [(r.job_id, r.array_job_id, r.array_task_id, r.state) for r in rows] == [
        ("2_2", "2", 2, JobState.PENDING), ("3", "3", None, JobState.PENDING), ("2_0", "2", 0, JobState.RUNNING),
        ("4", "4", None, JobState.SUCCEEDED), ("5", "5", None, JobState.UNKNOWN)]
    assert rows[0].reason == "JobArrayTaskLimit" and rows[2].reason == ""
    assert rows[3].gres == "gres:gpu:2" and rows[3].nodes == 2 and rows[3].work_dir == "/runs/a b"
    assert rows[3].nodelist == "n[1-2]" and rows[1].dependency == "afterok:2_*(unfulfilled)"
    assert rows[4].slurm_state == "BRAND_NEW_STATE"  # shown verbatim, folded to UNKNOWN


def test_parse_sacct() -> None:
    rows = slurm.parse_sacct(SACCT)
    assert [(r.job_id, r.slurm_state, r.state) for r in rows] == [
        ("1", "COMPLETED", JobState.SUCCEEDED), ("2_0", "COMPLETED", JobState.SUCCEEDED),
        ("3", "CANCELLED", JobState.CANCELLED), ("7", "TIMEOUT", JobState.FAILED),
        ("8", "NODE_FAIL", JobState.FAILED)]
    assert rows[1].array_job_id == "2" and rows[1].array_task_id == 0
    assert rows[0].work_dir.endswith("20261128T030559Z-0f94e9") and rows[3].exit_code == "0:15"


def test_unparseable_lines_are_counted_and_sbatch_output_quoted() -> None:
    rows = slurm.parse_squeue("garbage\n" + SQUEUE)
    assert len(rows) == 5 and rows.skipped == ["garbage"]
    assert slurm.parse_sacct("x\n").skipped == ["x"]
    with pytest.raises(SlurmCommandError, match='could not parse sbatch output "Submitted batch job"'):
        slurm.parse_sbatch("Submitted batch job\n")
    assert slurm.parse_sbatch("1234;cluster\n") == "1234"


def test_every_mapped_state_is_known() -> None:
    terminal = {s for s, j in slurm.SLURM_STATES.items() if j.is_terminal}
    assert {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} <= terminal
    assert not JobState.PENDING.is_terminal and not JobState.UNKNOWN.is_terminal


class Recorder:
    """A run_cmd at the process boundary: answers from canned text and counts the calls."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        rc, out, err = self.answers[argv[0]]
        return subprocess.CompletedProcess(list(argv), rc, out, err)


def test_query_jobs_makes_one_squeue_call_for_many_jobs() -> None:
    lines = "".join(f"{i}|{i}|N/A|RUNNING|None|0:01|10:00|1|N/A|u|n1|(null)|/r/{i}|j\n" for i in range(100, 199))
    rec = Recorder({"squeue": (0, lines.replace("|", slurm.SEP), ""),
                    "sacct": (0, "199|199|COMPLETED|0:0|00:00:01|10:00|1|/r/199|j\n".replace("|", slurm.SEP), "")})
    found = slurm.query_jobs([str(i) for i in range(100, 200)], run=rec)
    assert [c[0] for c in rec.calls] == ["squeue", "sacct"]  # one of each, for 100 jobs
    assert rec.calls[1][-1] == "--jobs=199"  # sacct only for the job that left the queue
    assert found["150"][0].state == JobState.RUNNING and found["199"][0].source == "sacct"


def test_query_jobs_groups_array_tasks() -> None:
    rec = Recorder({"squeue": (0, SQUEUE, ""), "sacct": (0, "", "")})
    found = slurm.query_jobs(["2", "3"], run=rec)
    assert [r.job_id for r in found["2"]] == ["2_2", "2_0"] and [r.job_id for r in found["3"]] == ["3"]
    assert len(rec.calls) == 1


def test_forgotten_single_job_falls_back_to_sacct() -> None:
    rec = Recorder({"squeue": (1, "", "slurm_load_jobs error: Invalid job id specified\n"), "sacct": (0, SACCT, "")})
    found = slurm.query_jobs(["7"], run=rec)
    assert [c[0] for c in rec.calls] == ["squeue", "sacct"]
    assert found["7"][0].slurm_state == "TIMEOUT"


def test_dead_controller_is_a_clear_error() -> None:
    proc = subprocess.CompletedProcess(["squeue"], 1, "", "squeue: error: Unable to contact slurm controller (connect "
                                       "failure)\nslurm_load_jobs error: Unable to contact slurm controller\n")
    with pytest.raises(ControllerUnreachable, match="does not answer"):
        _raise_like_run_cmd(proc)


def _raise_like_run_cmd(proc: subprocess.CompletedProcess[str]) -> None:
    # run_cmd's classification is what a dead controller goes through; feed it the recorded stderr
    # by running a tiny shell command that prints it and fails.
    script = f"printf %s {proc.stderr!r} >&2; exit 1"
    slurm.run_cmd(["bash", "-c", script])


def test_missing_client_tools_are_a_clear_error() -> None:
    with pytest.raises(ControllerUnreachable, match="is not installed"):
        slurm.run_cmd(["sbatch-that-is-not-installed", "--parsable"])
