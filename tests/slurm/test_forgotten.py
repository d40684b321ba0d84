"""Jobs Slurm has forgotten (issue 13 item 8), on the real local cluster: a plain job and a 2-task
array finish, squeue forgets them (MinJobAge=30 s here, purged on slurmctld's own cycle), and sacct
answers "accounting storage is disabled" through a fake `sacct` on PATH (a stub at the process
boundary: the local cluster does have accounting). Then `status` (by job id, task id and run dir),
`logs -f`, `queue`, `cancel` and `wait_for` must say UNKNOWN with what the run dir says, end, and never
crash (exit 70) or hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Forgotten:
    """Two finished jobs Slurm no longer knows, and a PATH whose sacct says accounting is off."""

    root: Path
    plain: str
    plain_dir: Path
    array: str
    array_dir: Path
    path: str  # PATH with the fake sacct first


def _submit(root: Path, name: str, extra: str) -> tuple[str, Path]:
    spec = root / f"{name}.yaml"
    spec.write_text(f"name: {name}\nresources: {{time_limit_min: 5}}\n{extra}"
                    "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1', --step-seconds, "
                    "'0.1']}\n")
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--set", f"cluster.run_root={root}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    job, run_dir = proc.stdout.strip().splitlines()[-1].removeprefix("submitted job ").split("  run dir: ")
    return job, Path(run_dir)


def _squeue_forgot(job: str) -> bool:
    return subprocess.run(["squeue", "--noheader", f"--jobs={job}"], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def forgotten(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forgotten]:
    root = tmp_path_factory.mktemp("forgotten")
    tag = uuid.uuid4().hex[:6]
    plain, plain_dir = _submit(root, f"forget{tag}-plain", "")
    array, array_dir = _submit(root, f"forget{tag}-arr", "array: {size: 2}\n")
    # MinJobAge=30 s on the local cluster; slurmctld purges on its own (about minute-long) cycle.
    wait_until(lambda: _squeue_forgot(plain) and _squeue_forgot(array), 240, "squeue to forget both jobs", every=3)
    fake = root / "fake-bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    yield Forgotten(root, plain, plain_dir, array, array_dir, f"{fake.parent}:{os.environ['PATH']}")


@pytest.fixture
def no_accounting(forgotten: Forgotten, monkeypatch: pytest.MonkeyPatch) -> Forgotten:
    """The fake sacct first on PATH, and the run root where the jobs' run dirs are."""
    monkeypatch.setenv("PATH", forgotten.path)
    monkeypatch.setenv("HPCQWEN_RUN_ROOT", str(forgotten.root))
    return forgotten


def _status(capsys: pytest.CaptureFixture[str], target: str) -> dict:  # type: ignore[type-arg]
    assert main(["status", target, "--json"]) == EXIT_OK, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_status_of_forgotten_jobs_with_fake_sacct_without_accounting(
        no_accounting: Forgotten, capsys: pytest.CaptureFixture[str]) -> None:
    f = no_accounting
    for target in (f.plain, str(f.plain_dir)):
        st = _status(capsys, target)
        assert st["run_dir"] == str(f.plain_dir), target  # found by the run root's manifests, not by Slurm
        [task] = st["tasks"]
        assert task["state"] == "UNKNOWN" and task["source"] == "none"
        assert "Slurm no longer knows" in task["reason"] and "done" in task["reason"], task
    for target in (f.array, str(f.array_dir)):
        st = _status(capsys, target)
        assert st["run_dir"] == str(f.array_dir), target
        assert [t["job_id"] for t in st["tasks"]] == [f"{f.array}_0", f"{f.array}_1"]
        assert all(t["state"] == "UNKNOWN" and "done" in t["reason"] for t in st["tasks"]), st
    st = _status(capsys, f"{f.array}_1")
    assert [t["job_id"] for t in st["tasks"]] == [f"{f.array}_1"] and st["tasks"][0]["state"] == "UNKNOWN"
    assert main(["status", f.array]) == EXIT_OK  # the text form too
    out = capsys.readouterr().out
    assert f"run dir   {f.array_dir}" in out and out.count("UNKNOWN") == 2


def test_logs_follow_of_forgotten_jobs_ends_with_fake_sacct_without_accounting(
        no_accounting: Forgotten) -> None:
    f = no_accounting
    for target in (f.plain, str(f.array_dir)):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "hpcqwen", "logs", "-f", target], capture_output=True,
                              text=True, timeout=60, cwd=REPO, env={**os.environ})
        assert proc.returncode == EXIT_OK, proc.stderr
        assert "steps: finished 1 steps" in proc.stdout, proc.stdout
        assert "Slurm no longer knows" in proc.stderr and "stopped following" in proc.stderr, proc.stderr
        assert time.monotonic() - start < 45


def test_cancel_of_forgotten_jobs_with_fake_sacct_without_accounting(
        no_accounting: Forgotten, capsys: pytest.CaptureFixture[str]) -> None:
    f = no_accounting
    for target in (f.plain, f"{f.array}_1", str(f.array_dir)):
        assert main(["cancel", target]) == EXIT_OK, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "nothing to cancel" in out and "Slurm no longer knows" in out, out
    assert main(["cancel", "3999999999"]) == 1  # neither Slurm nor a run dir knows it: a usage error
    err = capsys.readouterr().err
    assert "3999999999" in err and "Traceback" not in err


def test_queue_and_wait_of_forgotten_jobs_with_fake_sacct_without_accounting(
        no_accounting: Forgotten, tmp_path: Path) -> None:
    f = no_accounting
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "queue", "--json", "--run-root", str(f.root)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "HPCQWEN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == EXIT_OK, proc.stderr
    rows = {r["run_dir"]: r for r in json.loads(proc.stdout)["runs"]}
    plain, array = rows[str(f.plain_dir)], rows[str(f.array_dir)]
    assert plain["state"] == "UNKNOWN" and "done" in plain["reason"], plain
    assert [t["slurm_state"] for t in array["tasks"]] == ["UNKNOWN", "UNKNOWN"]
    assert all("done" in t["reason"] for t in array["tasks"]), array
    for target in (str(f.plain_dir), str(f.array_dir)):
        ref = runs.resolve_target(target)
        start = time.monotonic()
        rows_ = runs.wait_for(ref, first_poll_s=0.1, max_poll_s=0.2)
        assert time.monotonic() - start < 20 and {r.slurm_state for r in rows_} == {"UNKNOWN"}
