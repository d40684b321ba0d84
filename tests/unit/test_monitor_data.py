"""The monitor's data side without a cluster: the shared squeue cache and its backoff, and the join
of job rows with run dirs, metrics, checkpoints and restarts.

Slurm is faked only at the process boundary (the `run` command function), as in submitit's
MockedSubprocess; everything of hpcqwen's runs for real.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from hpcqwen import polling
from hpcqwen.checkpoints import checkpoint_dir, mark_complete
from hpcqwen.errors import ControllerUnreachable
from hpcqwen.monitor import Watch, array_state, fetch_rows, gpus_of, parse_duration, to_json
from hpcqwen.polling import poll_squeue
from hpcqwen.slurm import SEP, SQUEUE_FIELDS, JobRow

DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


class FakeSlurm:
    """squeue / sacct at the process boundary: canned output, a switch to play a dead controller."""

    def __init__(self, squeue_out: str = "", sacct_out: str = "") -> None:
        self.squeue_out, self.sacct_out = squeue_out, sacct_out
        self.calls: list[list[str]] = []
        self.down = False
        self.delay_s = 0.0

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if self.down:  # what run_cmd raises when the client prints the "Unable to contact" line
            raise ControllerUnreachable(f"the Slurm controller does not answer: {DOWN}")
        time.sleep(self.delay_s)
        out = self.squeue_out if argv[0] == "squeue" else self.sacct_out
        return subprocess.CompletedProcess(list(argv), 0, out, "")

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c[0] == command)


def sq(jid: str, state: str, work_dir: str | Path, name: str = "job", *, reason: str = "None", task: str = "N/A",
       array: str = "", elapsed: str = "10:00", limit: str = "1:00:00", nodes: str = "1", gres: str = "N/A",
       user: str = "alice", nodelist: str = "n1", dep: str = "(null)") -> str:
    """One line of `squeue --format=<slurm.SQUEUE_FIELDS joined by slurm.SEP>`."""
    by_letter = {"i": jid, "F": array or jid, "K": task, "T": state, "r": reason, "M": elapsed, "l": limit,
                 "D": nodes, "b": gres, "Z": str(work_dir), "j": name, "u": user, "N": nodelist, "E": dep}
    return SEP.join(by_letter[f[-1]] for f in SQUEUE_FIELDS)


def sa(*fields: object) -> str:
    """One line of `sacct --parsable2 --delimiter=<slurm.SEP> --format=<slurm.SACCT_FIELDS>`."""
    return SEP.join(str(f) for f in fields)


def make_run_dir(root: Path, name: str, job_ids: list[str], *, array_size: int | None = None, user: str = "alice",
                 age_s: float = 60.0) -> Path:
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)
    run_dir = root / name / f"{when.strftime('%Y%m%dT%H%M%SZ')}-abc123"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "spec.json").write_text("{}\n")
    (run_dir / "manifest.json").write_text(json.dumps({
        "name": name, "job_ids": job_ids, "backend": "slurm", "array_size": array_size, "user": user,
        "submitted_at": when.isoformat(timespec="seconds")}))
    return run_dir


def write_metrics(task_dir: Path, steps: range, total: int, t0: float, step_s: float = 2.0, **extra: float) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / "metrics.jsonl", "a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "total_steps": total, "loss": 3.0 / s, "lr": 1e-5,
                                "tokens_per_s": 1000.0, "time": t0 + s * step_s, **extra}) + "\n")


# ---- polling ----------------------------------------------------------------------------------

def test_one_squeue_per_interval_for_every_terminal(tmp_path: Path) -> None:
    fake = FakeSlurm(sq("7", "RUNNING", "/w"))
    rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 1000.0)
    assert [r.job_id for r in rows] == ["7"] and st.calls == 1 and st.fetched_at == 1000.0
    for t in (1001.0, 1015.0, 1029.9):  # other terminals, same cache dir
        rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda t=t: t)
        assert [r.job_id for r in rows] == ["7"] and st.calls == 0
    assert fake.count("squeue") == 1
    poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 1030.0)
    assert fake.count("squeue") == 2
    argv = fake.calls[0]
    assert "--states=all" in argv and "--array" in argv and not any(a.startswith("--jobs") for a in argv)


def test_interval_has_a_floor_and_force_respects_it(tmp_path: Path) -> None:
    fake = FakeSlurm(sq("7", "RUNNING", "/w"))
    poll_squeue(1, directory=tmp_path, run=fake, clock=lambda: 0.0)
    poll_squeue(1, directory=tmp_path, run=fake, clock=lambda: 4.0, force=True)
    assert fake.count("squeue") == 1
    poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 5.0, force=True)
    assert fake.count("squeue") == 2


def test_dead_controller_keeps_the_last_rows_and_backs_off(tmp_path: Path) -> None:
    fake = FakeSlurm(sq("7", "RUNNING", "/w"))
    poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 0.0)
    fake.down = True
    rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 30.0)
    assert [r.job_id for r in rows] == ["7"]  # stale, not empty
    assert DOWN in st.error and st.strikes == 1 and st.fetched_at == 0.0 and st.error_since == 30.0
    assert st.next_at == 90.0  # 2 x 30 s
    poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 89.0)
    assert fake.count("squeue") == 2
    _, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 90.0)
    assert st.strikes == 2 and st.next_at == 210.0 and st.error_since == 30.0
    _, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 93.0, force=True)  # `r`: not within 5 s
    assert fake.count("squeue") == 3
    fake.down = False
    rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 210.0)
    assert st.error == "" and st.strikes == 0 and st.fetched_at == 210.0 and st.next_at == 240.0
    assert polling.backoff_s(30, 10) == polling.MAX_BACKOFF_S


def test_slow_answer_is_shown_and_keeps_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polling, "SLOW_SQUEUE_S", 0.01)
    fake = FakeSlurm(sq("7", "PENDING", "/w"))
    fake.delay_s = 0.05
    rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 0.0)
    # not a strike (tests/unit/test_queue_query.py: the next call waits SLOW_SHARE x the answer's time)
    assert rows and st.error == "" and st.slow and st.strikes == 0 and st.next_at == 30.0


def test_unparseable_output_is_counted_not_raised(tmp_path: Path) -> None:
    fake = FakeSlurm("this is not squeue output\n")
    rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 0.0)
    assert rows == [] and st.error == "" and st.skipped == 1 and st.skipped_line == "this is not squeue output"


def test_a_busy_lock_means_read_the_cache_not_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSlurm(sq("7", "RUNNING", "/w"))
    poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 0.0)
    lock = next(tmp_path.glob("squeue-*.lock"))
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from filelock import FileLock\n"
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(polling, "LOCK_WAIT_S", 0.2)
        rows, st = poll_squeue(30, directory=tmp_path, run=fake, clock=lambda: 100.0)
        assert [r.job_id for r in rows] == ["7"] and st.calls == 0 and fake.count("squeue") == 1
    finally:
        holder.kill()
        holder.wait()


def test_unwritable_cache_dir_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    fake = FakeSlurm(sq("7", "RUNNING", "/w"))
    rows, st = poll_squeue(30, directory=blocker / "cache", run=fake, clock=lambda: 1e9)
    assert [r.job_id for r in rows] == ["7"] and st.calls == 1
    assert list(tmp_path.glob("hpcqwen-cache-*/squeue-*.json"))


# ---- the join -----------------------------------------------------------------------------------

def test_running_job_with_metrics_checkpoint_and_restarts(tmp_path: Path) -> None:
    now = time.time()
    run_dir = make_run_dir(tmp_path, "sft", ["41"])
    write_metrics(run_dir, range(1, 21), total=100, t0=now - 100)
    for step in (10, 20):
        ck = checkpoint_dir(run_dir / "checkpoints", step)
        ck.mkdir(parents=True)
        mark_complete(ck)
    checkpoint_dir(run_dir / "checkpoints", 30).mkdir()  # being written: not complete
    (run_dir / "launches.jsonl").write_text('{"restart_count": 0}\n{"restart_count": 2}\nnot json\n')
    jobs = [JobRow("41", "41", None, "RUNNING", "", "sft", "10:00", "1:00:00", 2, "gres:gpu:8", str(run_dir),
                   user="alice", nodelist="n[1-2]"),
            JobRow("42", "42", None, "RUNNING", "", "other", "1:00", "1:00:00", 1, "", "/tmp")]  # not hpcqwen
    rows = fetch_rows(jobs, run_root=None, fetched_at=now, now=now, run=FakeSlurm())
    assert len(rows) == 1
    r = rows[0]
    assert (r.name, r.job_id, r.slurm_state, r.nodes, r.gpus_per_node, r.nodelist) == \
        ("sft", "41", "RUNNING", 2, 8, "n[1-2]")
    assert r.elapsed_s == 600 and r.time_limit_s == 3600 and r.elapsed_at == now and r.restarts == 2
    assert r.checkpoint_step == 20 and r.checkpoint_at is not None
    p = r.progress
    assert p is not None and p.step == 20 and p.total_steps == 100 and p.loss == pytest.approx(0.15)
    assert len(p.losses) == 20 and p.steps_per_s == pytest.approx(0.5) and p.eta_s == pytest.approx(160)
    json.dumps(to_json(rows, polling.PollStatus(fetched_at=now), now))  # --json can print it


def test_array_collapses_into_one_row(tmp_path: Path) -> None:
    now = time.time()
    run_dir = make_run_dir(tmp_path, "sweep", ["50"], array_size=4)
    for i in (0, 1):
        write_metrics(run_dir / "tasks" / str(i), range(1, 6), total=10, t0=now - 20, reward_mean=0.5 + i / 10)
    squeue_out = "\n".join([
        sq("50_0", "RUNNING", run_dir, "sweep", task="0", array="50"),
        sq("50_1", "RUNNING", run_dir, "sweep", task="1", array="50"),
        sq("50_2", "PENDING", run_dir, "sweep", task="2", array="50", reason="JobArrayTaskLimit", nodelist=""),
        sq("50_3", "PENDING", run_dir, "sweep", task="3", array="50", reason="JobArrayTaskLimit", nodelist="")])
    fake = FakeSlurm(squeue_out)
    rows = fetch_rows(poll_squeue(30, directory=tmp_path / "c", run=fake)[0], run_root=tmp_path, fetched_at=now,
                      now=now, run=fake)
    assert len(rows) == 1 and fake.count("sacct") == 0
    r = rows[0]
    assert r.is_array and r.slurm_state == "RUNNING" and [t.slurm_state for t in r.tasks] == \
        ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert r.tasks[2].reason == "JobArrayTaskLimit" and r.tasks[0].progress and r.tasks[0].progress.step == 5
    assert r.progress and r.progress.step == 10 and r.progress.reward_mean == pytest.approx(0.55)
    assert r.progress.eta_s is None  # tasks still wait: no promise


def test_run_dirs_whose_jobs_left_the_queue_cost_one_sacct(tmp_path: Path) -> None:
    now = time.time()
    done = make_run_dir(tmp_path, "done", ["60"])
    arr = make_run_dir(tmp_path, "arr", ["61"], array_size=2)
    make_run_dir(tmp_path, "ancient", ["10"], age_s=5 * 86400)  # outside the recent window
    make_run_dir(tmp_path, "bob", ["62"], user="bob")
    sacct_out = "\n".join([sa(60, 60, "COMPLETED", "0:0", "00:10:00", "01:00:00", 1, "/x", "done"),
                           sa("61_0", "61_0", "COMPLETED", "0:0", "00:01:00", "01:00:00", 1, "/x", "arr"),
                           sa("61_1", "61_1", "CANCELLED by 0", "0:15", "00:00:30", "01:00:00", 1, "/x", "arr"),
                           sa(62, 62, "FAILED", "1:0", "00:00:01", "01:00:00", 1, "/x", "bob")])
    fake = FakeSlurm("", sacct_out)
    rows = {r.name: r for r in fetch_rows([], run_root=tmp_path, fetched_at=now, now=now, user="alice", run=fake)}
    assert set(rows) == {"done", "arr"}
    assert fake.count("sacct") == 1 and "--jobs=60,61" in " ".join(fake.calls[0]) or \
        "--jobs=61,60" in " ".join(fake.calls[0])
    assert rows["done"].slurm_state == "COMPLETED" and rows["done"].source == "sacct"
    assert rows["arr"].slurm_state == "CANCELLED" and [t.slurm_state for t in rows["arr"].tasks] == \
        ["COMPLETED", "CANCELLED"]
    assert str(done) == rows["done"].run_dir and str(arr) == rows["arr"].run_dir
    rows = {r.name: r for r in fetch_rows([], run_root=tmp_path, fetched_at=now, now=now, ask_sacct=False,
                                          run=fake)}
    assert fake.count("sacct") == 1 and rows["done"].slurm_state == "UNKNOWN" and rows["done"].reason == "NoData"


def test_watch_asks_sacct_once_per_squeue_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_CACHE_DIR", str(tmp_path / "cache"))
    done = make_run_dir(tmp_path / "runs", "done", ["60"])
    make_run_dir(tmp_path / "runs", "lagging", ["70"])  # accounting has no record yet
    fake = FakeSlurm("", sa(60, 60, "COMPLETED", "0:0", "00:10:00", "01:00:00", 1, done, "done"))
    watch = Watch(tmp_path / "runs", 30, me="alice", run=fake)
    for _ in range(3):
        snap = watch.refresh()
    assert fake.count("squeue") == 1 and fake.count("sacct") == 1 and watch.squeue_calls == 1
    assert {r.name: r.slurm_state for r in snap.rows} == {"done": "COMPLETED", "lagging": "UNKNOWN"}


def test_small_parsers() -> None:
    assert [parse_duration(t) for t in ("0:00", "12:34", "1:02:03", "2-01:00:00", "UNLIMITED", "30", "")] == \
        [0, 754, 3723, 176400, None, 1800, None]
    assert [gpus_of(g) for g in ("gres:gpu:2", "gres/gpu:h100:8", "gres/gpu=4", "", "N/A")] == [2, 8, 4, 0, 0]
    assert array_state(["COMPLETED", "PENDING"]) == "PENDING"
    assert array_state(["COMPLETED", "TIMEOUT", "RUNNING"]) == "RUNNING"
    assert array_state(["COMPLETED", "COMPLETED"]) == "COMPLETED"
    assert array_state(["COMPLETED", "NODE_FAIL"]) == "NODE_FAIL"


def test_squeue_tail_fields_user_nodelist_dependency() -> None:
    from hpcqwen.slurm import parse_squeue

    (row,) = parse_squeue(sq("9", "PENDING", "/r", "a|b|c", reason="Dependency", gres="gres:gpu:8", nodelist="",
                             dep="afterok:8(unfulfilled)"))
    assert (row.name, row.user, row.nodelist, row.dependency) == ("a|b|c", "alice", "", "afterok:8(unfulfilled)")



def test_restarts_continue_across_a_resume(tmp_path: Path) -> None:
    """`hpcqwen resume` is a new job whose SLURM_RESTART_COUNT starts at 0: the starts still count."""
    from hpcqwen.progress import restarts_of

    run = tmp_path / "run"
    run.mkdir()
    (run / "launches.jsonl").write_text('{"job_id": "7", "restart_count": 0}\n{"job_id": "7", "restart_count": 1}\n'
                                        '{"job_id": "9", "restart_count": 0}\n')
    assert restarts_of(run) == {None: 2}
