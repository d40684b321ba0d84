"""Helpers of the Slurm tests that submit jobs (test_core.py, test_preemption.py, test_signals.py,
test_shared_nodes.py, test_watchdog_slurm.py): submit through the CLI, a steps job, its state and progress, a
preempting job in `high`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpcqwen import slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK

DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"


def submit(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[str, Path]:
    """`hpcqwen submit ARGV` through the real CLI; returns (job id, run dir)."""
    rc = main(["submit", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err + out
    line = next(x for x in out.splitlines() if x.startswith("submitted job "))
    job, run_dir = line.removeprefix("submitted job ").split("  run dir: ")
    return job, Path(run_dir)


def steps_spec(write_spec, name: str, steps: int, step_s: float, extra: str = "", partition: str = "debug") -> Path:
    return write_spec(f"""
        name: {name}
        resources: {{time_limit_min: 10, partition: {partition}}}
        task: {{kind: command, module: hpcqwen.examples.steps, args: [--steps, '{steps}', --step-seconds, '{step_s}']}}
        {extra}
    """, f"{name}.yaml")


def step_of(task_dir: Path) -> int:
    path = task_dir / "progress.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


def state(job: str) -> str:
    rows = slurm.query_jobs([job])[job]
    return rows[0].slurm_state if rows else ""


def preempt(job: str, command: str) -> subprocess.CompletedProcess[str]:
    """A job in partition `high` that needs exactly the nodes `job` holds (so it must preempt it)."""
    nodes = subprocess.run(["squeue", "--noheader", "-o", "%N", f"--jobs={job}"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    count = len(subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split())
    return subprocess.run(["sbatch", "--parsable", "-p", "high", f"-N{count}", f"--nodelist={nodes}", "--exclusive",
                           "-J", "preemptor", "-o", "/dev/null", "--wrap", command], capture_output=True, text=True,
                          check=True)


def log_of(run_dir: Path) -> str:
    """Every log of the run, oldest name first."""
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))
