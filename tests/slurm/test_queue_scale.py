"""`hpcqwen queue` on a queue full of another user's jobs (issue 13 item 7), on the real local cluster:
200 held jobs of the second Unix user `hpcqwen2` (bench/queue_scale.py has the 2,000-job version and
its table in bench/RESULTS.md), some with `|`, spaces, tabs, unicode and a newline in their names and
work dirs. `queue --me --once` must ask squeue only for this user's jobs (one call, counted by shims
on PATH at the process boundary), show this user's run and exit 0; the parser must give those odd
rows back exactly, and a row a newline split is skipped and counted, never fatal."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcqwen import polling, slurm

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import queue_scale as qs  # noqa: E402 - bench/ holds the set-up shared with the full benchmark


@dataclass(frozen=True)
class Crowded:
    """This user's run (pending on a held sleeper) in a queue with another user's held jobs."""

    tag: str
    run_dir: Path
    foreign: list[str]
    work: Path


@pytest.fixture(scope="module")
def crowded(slurm_cluster: str) -> Iterator[Crowded]:
    tag = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix=f"hpcqwen-qscale-{tag}-"))
    work.chmod(0o755)
    mine: list[str] = []
    foreign: list[str] = []
    try:
        run_dir = qs.submit_mine(work / "runs", tag, mine)
        qs.submit_foreign(195, tag, foreign)
        qs.submit_foreign(5, tag, foreign, odd=True)
        assert len(foreign) == 200
        yield Crowded(tag, run_dir, foreign, work)
    finally:
        qs.cancel(foreign, qs.SECOND_USER)
        qs.cancel(mine)
        shutil.rmtree(Path(tempfile.gettempdir()) / f"hpcqwen-{tag}-foreign", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_queue_me_asks_for_my_jobs_only_with_200_foreign_jobs(crowded: Crowded) -> None:
    shims = qs.make_shims(crowded.work / f"bin-{uuid.uuid4().hex[:4]}")
    run = qs.run_queue("after", REPO, shims, crowded.run_dir.parents[1], crowded.run_dir.parent.name, crowded.work)
    assert run.rc == 0 and run.shown, run
    assert run.calls == {"squeue": 1} and run.rpcs <= 2, run  # sacct: the run is still queued
    calls = (shims / ".log").read_text()
    assert calls.count("squeue") == 1
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "HPCQWEN_CACHE_DIR": str(crowded.work / "c2")}
    proc = qs.sh([sys.executable, "-m", "hpcqwen", "queue", "--me", "--json", "--run-root",
                  str(crowded.run_dir.parents[1])], env=env, cwd=REPO, timeout=120)
    data = json.loads(proc.stdout)
    [row] = [r for r in data["runs"] if r["run_dir"] == str(crowded.run_dir)]
    assert row["state"] == "PENDING" and row["reason"] == "Dependency" and row["user"] == "root"
    assert data["squeue"]["skipped"] == 0 and data["squeue"]["error"] == ""


def test_odd_names_and_work_dirs_of_another_user_parse_exactly(crowded: Crowded, tmp_path: Path) -> None:
    rows = slurm.squeue(user=qs.SECOND_USER)
    mine = {r.job_id: r for r in rows if r.job_id in set(crowded.foreign)}
    assert len(mine) == 200
    odd = [r for r in mine.values() if not r.name.startswith(f"q13-{crowded.tag}-")]
    base = Path(tempfile.gettempdir()) / f"hpcqwen-{crowded.tag}-foreign"
    expected = {(f"{qs.ODD[i]}{i}".split("\n")[0], str(base / qs.ODD[i].replace("\n", " ") / str(i)))
                for i in range(5)}
    assert {(r.name, r.work_dir) for r in odd} == expected  # the newline one keeps the part before it
    assert all(r.user == qs.SECOND_USER and r.reason == "JobHeldUser" for r in odd)
    assert "line|x3" in rows.skipped  # the rest of the name after the newline: left out, counted
    # The whole queue (what `queue` asked before) now parses too, with the count in the status.
    all_rows, st = polling.poll_squeue(directory=tmp_path, query=polling.Query())
    assert st.error == "" and st.skipped >= 1 and {r.job_id for r in all_rows} >= set(crowded.foreign)
