"""`hpcqwen queue` on big, shared queues without a cluster (issue 13 items 7 and 17): squeue is asked
only for what is shown, free-text fields cannot break the parse, an odd line is skipped and counted,
slow answers do not push the refresh to 600 s, `r` skips the backoff, sacct answers are shared by
every terminal, fresh metrics make a stale PENDING read RUNNING, and the live view's selection stays
on its job.

Slurm is faked only at the process boundary: `FakeSqueue` renders each job through the `--format`
string that hpcqwen passes (as squeue does, `%x` by `%x`) and filters by `--user` / `--jobs` as
squeue does, so the tests hold whatever separator and field order hpcqwen picks.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console
from test_monitor_data import make_run_dir, write_metrics

from hpcqwen import polling, slurm
from hpcqwen.monitor import RunRow, Snapshot, Watch, fetch_rows
from hpcqwen.monitor_view import render_table
from hpcqwen.polling import PollStatus, poll_squeue

DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


def job(jid: str, user: str, work_dir: str | Path, name: str, state: str = "PENDING", **kw: str) -> dict[str, str]:
    """One job as squeue knows it, by squeue's format letters."""
    fields = {"i": jid, "F": kw.get("array", jid.split("_")[0]), "K": kw.get("task", "N/A"), "T": state,
              "r": kw.get("reason", "JobHeldUser" if state == "PENDING" else "None"), "M": "0:00",
              "l": "1:00:00", "D": "1", "b": "N/A", "Z": str(work_dir), "j": name, "u": user, "N": "",
              "E": "(null)"}
    return fields


class FakeSqueue:
    """squeue and sacct at the process boundary, for a queue of many users' jobs."""

    def __init__(self, jobs: list[dict[str, str]], sacct_out: str = "", delay_s: float = 0.0) -> None:
        self.jobs, self.sacct_out, self.delay_s = jobs, sacct_out, delay_s
        self.calls: list[list[str]] = []
        self.down = False

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if self.down:
            from hpcqwen.errors import ControllerUnreachable
            raise ControllerUnreachable(f"the Slurm controller does not answer: {DOWN}")
        time.sleep(self.delay_s)
        if argv[0] == "sacct":
            return subprocess.CompletedProcess(list(argv), 0, self.sacct_out, "")
        opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        fmt = opts["--format"]
        users = set(opts["--user"].split(",")) if "--user" in opts else None
        ids = set(opts["--jobs"].split(",")) if "--jobs" in opts else None
        out = []
        for j in self.jobs:
            if (users is None or j["u"] in users) and (ids is None or j["F"] in ids or j["i"] in ids):
                out.append(re.sub(r"%\.?\d*([A-Za-z])", lambda m, j=j: j[m.group(1)], fmt))  # type: ignore[misc]
        return subprocess.CompletedProcess(list(argv), 0, "".join(line + "\n" for line in out), "")

    def squeue_calls(self) -> list[list[str]]:
        return [c for c in self.calls if c[0] == "squeue"]

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c[0] == command)


def foreign_queue(n: int) -> list[dict[str, str]]:
    """n held jobs of another user, some with names and work dirs that break naive parsers."""
    odd = ["a|b c", "ünïcødé ✓", "tab\there", "new\nline|x", "sep\x1fin name", "  spaces  "]
    return [job(str(1000 + i), "bob", f"/home/bob/{odd[i % len(odd)]}/{i}", odd[i % len(odd)] + str(i))
            for i in range(n)]


# ---- item 7: what is asked, and how it is parsed ----------------------------------------------------

def test_me_asks_squeue_for_my_jobs_only(tmp_path: Path) -> None:
    mine = make_run_dir(tmp_path / "runs", "mine", ["60"], user="alice")
    fake = FakeSqueue(foreign_queue(200) + [job("60", "alice", mine, "mine", "RUNNING")])
    watch = Watch(tmp_path / "runs", 30, user="alice", me="alice", directory=tmp_path / "cache", run=fake)
    snap = watch.refresh()
    assert [c for c in fake.squeue_calls() if "--user=alice" not in c] == []
    assert len(fake.squeue_calls()) == 1 and snap.status.error == "" and snap.status.skipped == 0
    assert [(r.name, r.slurm_state) for r in snap.rows] == [("mine", "RUNNING")]


def test_default_asks_for_my_jobs_and_the_run_roots_other_jobs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    mine = make_run_dir(root, "mine", ["60"], user="alice")
    bobs = make_run_dir(root, "bobs", ["62"], user="bob")
    local = make_run_dir(root, "loc", ["local-4242"], user="bob")
    manifest = json.loads((local / "manifest.json").read_text())
    (local / "manifest.json").write_text(json.dumps({**manifest, "backend": "local"}))
    fake = FakeSqueue(foreign_queue(50) + [job("60", "alice", mine, "mine", "RUNNING"),
                                           job("62", "bob", bobs, "bobs", "RUNNING")])
    snap = Watch(root, 30, me="alice", directory=tmp_path / "cache", run=fake).refresh()
    asked = sorted(next(a for a in c if a.startswith(("--user=", "--jobs="))) for c in fake.squeue_calls())
    assert asked == ["--jobs=62", "--user=alice"]  # never the whole queue
    assert {r.name: r.slurm_state for r in snap.rows} == {"mine": "RUNNING", "bobs": "RUNNING", "loc": "FAILED"}


@pytest.mark.parametrize("name,work_dir", [
    ("a|b c", "/runs/with|pipe and space/x"), ("ünïcødé ✓ 名前", "/runs/ünï|cødé/ 名前 "),
    ("tab\tname", "/runs/tab\tdir"), ("sep\x1fname|", "/runs/plain"), ("(null)", "/runs/N/A")])
def test_free_text_fields_cannot_break_the_parse(name: str, work_dir: str) -> None:
    fake = FakeSqueue([job("7", "alice", "/runs/a", "before"), job("8_3", "alice", work_dir, name, "RUNNING",
                                                                     array="8", task="3"),
                       job("9", "alice", "/runs/b", "after", "RUNNING")])
    rows = slurm.squeue(user="alice", run=fake)
    assert [(r.job_id, r.name, r.work_dir, r.user, r.slurm_state) for r in rows] == [
        ("7", "before", "/runs/a", "alice", "PENDING"), ("8_3", name, work_dir, "alice", "RUNNING"),
        ("9", "after", "/runs/b", "alice", "RUNNING")]
    assert rows[1].array_job_id == "8" and rows[1].array_task_id == 3 and rows.skipped == []


def test_an_unparseable_line_is_skipped_and_counted_not_fatal(tmp_path: Path) -> None:
    # A newline in another user's job name splits its row in two: the head still parses (with the
    # name cut at the newline), the tail is left out and counted; every other row is kept.
    fake = FakeSqueue([job("7", "bob", "/x", "bad\nname"), job("8", "alice", "/runs/a", "good", "RUNNING")])
    rows, st = poll_squeue(query=polling.Query(), directory=tmp_path, run=fake, clock=lambda: 0.0)
    assert [(r.job_id, r.name) for r in rows] == [("7", "bad"), ("8", "good")]
    assert st.error == "" and st.skipped == 1 and st.skipped_line == "name"
    text = _frame([], st)
    assert "1 unparseable squeue line skipped" in text


def _frame(rows: list[RunRow], st: PollStatus) -> str:
    console = Console(record=True, width=140)
    console.print(render_table(rows, 100.0, 140, status=st, interval_s=30))
    return console.export_text()


def test_a_slow_answer_spaces_polls_by_its_duration_not_doubling_to_600s(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polling, "SLOW_SQUEUE_S", 0.01)
    fake = FakeSqueue([job("8", "alice", "/runs/a", "good")], delay_s=0.05)
    for t in (0.0, 30.0, 60.0, 90.0):
        rows, st = poll_squeue(30, query=polling.Query(user="alice"), directory=tmp_path, run=fake, clock=lambda t=t: t)
        assert rows and st.error == "" and st.strikes == 0, t
        assert st.next_at == t + 30.0  # 10 x 0.05 s is under the interval: no backoff at all
    monkeypatch.setattr(polling, "SLOW_SHARE", 1000.0)  # now 1000 x 0.05 s = 50 s > 30 s
    _, st = poll_squeue(30, query=polling.Query(user="alice"), directory=tmp_path, run=fake, clock=lambda: 200.0)
    assert st.calls == 1 and st.strikes == 0 and 200.0 + 45 < (st.next_at or 0) < 200.0 + 120
    assert "squeue took" in _frame([], st)
    _, st = poll_squeue(30, query=polling.Query(user="alice"), directory=tmp_path, run=fake, clock=lambda: 240.0)
    assert st.calls == 0 and len(fake.squeue_calls()) == 5


# ---- item 17 -------------------------------------------------------------------------------------------

def test_refresh_now_skips_the_backoff_but_not_the_floor(tmp_path: Path) -> None:
    fake = FakeSqueue([job("8", "alice", "/runs/a", "good")])
    q = polling.Query(user="alice")
    poll_squeue(30, query=q, directory=tmp_path, run=fake, clock=lambda: 0.0)
    fake.down = True
    for t in (30.0, 90.0, 210.0):  # three failures: the next try is 240 s later
        _, st = poll_squeue(30, query=q, directory=tmp_path, run=fake, clock=lambda t=t: t)
    assert st.strikes == 3 and st.next_at == 210.0 + 240.0
    fake.down = False
    poll_squeue(30, query=q, directory=tmp_path, run=fake, clock=lambda: 212.0, force=True)
    assert len(fake.squeue_calls()) == 4  # within MIN_INTERVAL_S of the last try: not even `r` calls
    rows, st = poll_squeue(30, query=q, directory=tmp_path, run=fake, clock=lambda: 216.0, force=True)
    assert len(fake.squeue_calls()) == 5 and st.error == "" and st.strikes == 0 and rows


def test_sacct_answers_are_shared_by_every_terminal_and_final_states_kept(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    done = make_run_dir(root, "done", ["60"])
    running = make_run_dir(root, "lagging", ["70"])  # accounting still says RUNNING (it lags)
    sacct_out = (f"60\x1f60\x1fCOMPLETED\x1f0:0\x1f00:10:00\x1f01:00:00\x1f1\x1f{done}\x1fdone\n"
                 f"70\x1f70\x1fRUNNING\x1f0:0\x1f00:10:00\x1f01:00:00\x1f1\x1f{running}\x1flagging\n")
    fake, base = FakeSqueue([], sacct_out), time.time()

    def terminal(t: float) -> dict[str, str]:  # a fresh process: `hpcqwen queue --once`
        watch = Watch(root, 30, me="alice", directory=tmp_path / "cache", run=fake, clock=lambda: base + t)
        return {r.name: r.slurm_state for r in watch.refresh().rows}
    assert terminal(0.0) == {"done": "COMPLETED", "lagging": "RUNNING"}
    assert terminal(10.0) == terminal(20.0) == {"done": "COMPLETED", "lagging": "RUNNING"}
    assert fake.count("sacct") == 1  # three terminals, one DBD query
    terminal(40.0)  # the interval passed: only the unfinished job is asked again
    assert fake.count("sacct") == 2 and fake.calls[-1][-1] == "--jobs=70"
    # The cluster's job ids restarted: job 60 is now another run. A cached final state of a job with
    # another work dir is not trusted.
    other = make_run_dir(root, "reused", ["60"], age_s=30)
    fake.sacct_out = f"60\x1f60\x1fFAILED\x1f1:0\x1f00:00:01\x1f01:00:00\x1f1\x1f{other}\x1freused\n"
    states = terminal(45.0)
    assert states["reused"] == "FAILED" and fake.count("sacct") == 3


def test_fresh_metrics_make_a_stale_pending_read_running(tmp_path: Path) -> None:
    now = time.time()
    started = make_run_dir(tmp_path, "started", ["41"])
    waiting = make_run_dir(tmp_path, "waiting", ["42"])
    arr = make_run_dir(tmp_path, "arr", ["43"], array_size=2)
    write_metrics(started, range(1, 5), total=100, t0=now - 9, step_s=2.0)  # newest line: now - 1
    write_metrics(waiting, range(1, 5), total=100, t0=now - 600)  # a requeue: metrics older than squeue's answer
    write_metrics(arr / "tasks" / "1", range(1, 3), total=10, t0=now - 5, step_s=2.0)
    fetched = now - 20  # squeue's answer (every 30 s) is older than the metrics (every 5 s)
    jobs = [slurm.JobRow("41", "41", None, "PENDING", "Resources", "started", work_dir=str(started)),
            slurm.JobRow("42", "42", None, "PENDING", "BeginTime", "waiting", work_dir=str(waiting)),
            slurm.JobRow("43_0", "43", 0, "RUNNING", "", "arr", work_dir=str(arr)),
            slurm.JobRow("43_1", "43", 1, "PENDING", "JobArrayTaskLimit", "arr", work_dir=str(arr))]
    rows = {r.name: r for r in fetch_rows(jobs, run_root=None, fetched_at=fetched, now=now, run=FakeSqueue([]))}
    assert rows["started"].slurm_state == "RUNNING" and rows["started"].reason == ""
    assert rows["waiting"].slurm_state == "PENDING" and rows["waiting"].reason == "BeginTime"
    assert [t.slurm_state for t in rows["arr"].tasks] == ["RUNNING", "RUNNING"]


def test_the_selection_stays_on_its_job_when_rows_arrive(tmp_path: Path) -> None:
    from hpcqwen.monitor_live import LiveQueue

    root = tmp_path / "runs"
    now = time.time()
    a, b = (make_run_dir(root, n, [j], age_s=age) for n, j, age in (("a", "10", 300), ("b", "11", 200)))
    for d in (a, b):
        (d / "logs" / f"{d.parent.name}-{d.name}.out").write_text(f"log of {d.parent.name}\n")

    def row(d: Path, jid: str, state: str, at: float) -> RunRow:
        return RunRow(d.parent.name, jid, str(d), state, submitted_at=at)
    live = LiveQueue(Watch(root, 30, me="alice", directory=tmp_path / "c", run=FakeSqueue([])),
                     Console(width=120, height=30))
    live.snapshot = Snapshot([row(a, "10", "RUNNING", now - 300), row(b, "11", "RUNNING", now - 200)],
                             PollStatus(), now)
    live.frame(now)
    live.move(1)  # newest first: b, a -> a is selected
    assert live.current() is not None and live.current()[0].job_id == "10"  # type: ignore[index]
    c = make_run_dir(root, "c", ["12"], age_s=10)
    live.snapshot = Snapshot([row(c, "12", "RUNNING", now - 10), row(a, "10", "RUNNING", now - 300),
                              row(b, "11", "RUNNING", now - 200)], PollStatus(), now)
    live.frame(now)
    assert live.current()[0].job_id == "10"  # type: ignore[index]
    # `hpcqwen resume` adds a job to run a (its JOB reads "10,13") while another run arrives: the
    # selection follows the run (its run dir), not a row position.
    d = make_run_dir(root, "d", ["14"], age_s=5)
    live.snapshot = Snapshot([row(d, "14", "PENDING", now - 5), row(c, "12", "RUNNING", now - 10),
                              row(a, "10,13", "PENDING", now - 300), row(b, "11", "RUNNING", now - 200)],
                             PollStatus(), now)
    live.frame(now)
    assert live.current()[0].run_dir == str(a)  # type: ignore[index]
    live.handle("l")
    assert live.mode == "log" and live.log_lines and live.log_lines[0] == "log of a"


def test_caches_of_queries_nobody_asks_any_more_are_removed(tmp_path: Path) -> None:
    import os

    fake = FakeSqueue([job("8", "alice", "/runs/a", "good")])
    poll_squeue(30, query=polling.Query(user="alice", job_ids=("1",)), directory=tmp_path, run=fake)
    [old] = tmp_path.glob("squeue-*.json")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    poll_squeue(30, query=polling.Query(user="alice", job_ids=("1", "2")), directory=tmp_path, run=fake)
    assert not old.exists() and len(list(tmp_path.glob("squeue-*.json"))) == 1


def test_the_live_view_does_not_offer_to_cancel_a_job_slurm_forgot(tmp_path: Path) -> None:
    from hpcqwen.monitor_live import LiveQueue

    live = LiveQueue(Watch(tmp_path, 30, me="alice", directory=tmp_path / "c", run=FakeSqueue([])),
                     Console(width=120, height=30))
    forgotten = RunRow("gone", "10", str(tmp_path / "gone"), "UNKNOWN", "not in squeue or sacct; the run dir "
                       "says: done", source="none")
    live.snapshot = Snapshot([forgotten], PollStatus(), time.time())
    live.handle("c")
    assert live.mode == "table" and live.message == "nothing to cancel here"
    live.snapshot = Snapshot([RunRow("held", "11", str(tmp_path / "held"), "PENDING", "JobHeldUser")], PollStatus(),
                             time.time())
    live.handle("c")
    assert live.mode == "confirm" and live.confirm == ["11"]
