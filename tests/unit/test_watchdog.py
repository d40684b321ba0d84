"""The watchdog's pieces without a cluster: the verdict over heartbeats on the watcher's clock (hang, stuck
start, the save allowance, ranks that exited, modules that do not beat), stragglers, the suspect rule and the
report, the action plan (restart counting), heartbeat writing (rate, forced save), stack parsing of real py-spy
and faulthandler dumps of a real sleeping process, the exclusion helper's argument checks, the spec fields,
the monitor's alert, and the launcher's 2-"node" run on this machine: a hang dumped, reported and ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcqwen import hangaction, heartbeat, stacks, watchview
from hpcqwen.errors import SpecError
from hpcqwen.hangreport import RankInfo, list_reports, render, suspect_nodes, suspects
from hpcqwen.watchconfig import Layout, WatchConfig
from hpcqwen.watchdog import Tracker, assess, stragglers

CFG = WatchConfig(hang_timeout_s=10, startup_timeout_s=60, save_timeout_s=100, on_hang="requeue",
                  exclude_bad_node=True, straggler_ratio=2.0, poll_s=1.0)
LAYOUT = Layout("77", 0, 1, ("n1", "n2"), "77")


def beat(rank: int, phase: str, step: int, beats: int, source: str = "rank", **extra: object) -> dict:
    return {"job_id": "77", "restart": 0, "rank": rank, "host": f"n{rank + 1}", "pid": 100 + rank, "source": source,
            "phase": phase, "step": step, "beats": beats, **extra}


def run_polls(polls: list[tuple[float, dict[int, dict]]], cfg: WatchConfig = CFG) -> list[object]:
    tracker, out = Tracker(), []
    for now, beats in polls:
        tracker.update(beats, now)
        out.append(assess(tracker, beats, LAYOUT, cfg, since=0.0, now=now))
    return out


def test_a_hang_is_called_one_poll_after_the_allowance_at_most_and_not_before() -> None:
    moving = [(float(t), {0: beat(0, "forward", t, t), 1: beat(1, "forward", t, t)}) for t in range(1, 6)]
    stuck = [(float(t), {0: beat(0, "data", 5, 99), 1: beat(1, "data", 5, 99)}) for t in range(6, 20)]
    verdicts = run_polls(moving + stuck)
    first = next(i for i, v in enumerate(verdicts) if v is not None)
    # the last change was seen at t=6 (it happened after the poll at t=5): called at t=15 = 5 + 10
    assert (moving + stuck)[first][0] == 15.0
    assert verdicts[first].kind == "hang" and verdicts[first].ranks == (0, 1)


def test_the_save_phase_has_its_own_allowance_and_exited_ranks_are_not_hung() -> None:
    polls = [(float(t), {0: beat(0, "save", 4, 50), 1: beat(1, "exited", 4, 60)}) for t in range(1, 60)]
    assert run_polls(polls) == [None] * 59  # 59 s in save < save_timeout_s 100; rank 1 ended
    polls = [(float(t), {0: beat(0, "save", 4, 50), 1: beat(1, "save", 4, 60)}) for t in range(1, 103)]
    assert run_polls(polls)[-1] is not None


def test_stuck_start_needs_every_rank_to_train_unless_the_module_does_not_beat() -> None:
    polls = [(float(t), {0: beat(0, "data", 0, t), 1: beat(1, "loading", -1, 1, source="launcher")})
             for t in range(1, 62)]
    verdicts = run_polls(polls)
    assert verdicts[58] is None and verdicts[60].kind == "stuck start" and verdicts[60].ranks == (1,)
    command = WatchConfig(**{**CFG.__dict__, "runner_beats": False})
    assert run_polls(polls, command)[-1] is None


def test_a_changed_heartbeat_of_another_attempt_or_pid_counts_as_progress_only_for_its_rank() -> None:
    t = Tracker()
    t.update({0: beat(0, "data", 1, 1)}, 1.0)
    t.update({0: beat(0, "data", 1, 1)}, 2.0)
    assert t.age(0, 5.0) == 4.0 and t.age(1, 5.0) is None
    t.update({0: {**beat(0, "data", 1, 1), "pid": 999}}, 6.0)  # a new writer: progress after the poll at 2.0
    assert t.age(0, 7.0) == 5.0
    t.update({0: {**beat(0, "data", 2, 2), "pid": 999, "lag_s": 1.5}}, 8.0)  # its beat came 1.5 s before the write
    assert t.age(0, 9.0) == 9.0 - (6.0 - 1.5)


def test_stragglers_compare_with_the_median_of_the_other_ranks() -> None:
    beats = {0: beat(0, "data", 9, 1, work_s=0.1), 1: beat(1, "data", 9, 1, work_s=0.31),
             2: beat(2, "data", 9, 1, work_s=0.12)}
    found = stragglers(beats, 2.0)
    assert [(s["rank"], s["host"], s["ratio"]) for s in found] == [(1, "n2", 2.82)]
    assert stragglers(beats, None) == [] and stragglers({0: beat(0, "data", 1, 1, work_s=1.0)}, 2.0) == []


def test_the_suspect_rule() -> None:
    r0 = RankInfo(0, "n1", 6, "data", 11.0, 100, "in collective all_reduce", True, "py-spy", "n1-0.txt")
    r1 = RankInfo(1, "n2", 6, "data", 11.0, 101, "in sleep_forever", False, "py-spy", "n2-1.txt")
    found, why = suspects([r0, r1], {"n1", "n2"})
    assert [r.rank for r in found] == [1] and why.startswith("not in a collective")
    assert suspect_nodes(found, [r0, r1]) == ["n2"]
    gone = RankInfo(1, "n2")
    assert [r.rank for r in suspects([r0, gone], {"n1"})[0]] == [1]  # no heartbeat, no answer
    both = [RankInfo(0, "n1", 6, "data", 11.0, in_collective=True), RankInfo(1, "n2", 5, "data", 11.0,
                                                                              in_collective=True)]
    assert [r.rank for r in suspects(both, {"n1", "n2"})[0]] == [1]  # behind
    alike = [RankInfo(0, "n1", 6, "data", 11.0), RankInfo(1, "n2", 6, "data", 11.0)]
    assert suspects(alike, {"n1", "n2"})[0] == [] and suspect_nodes([], alike) == []
    assert suspect_nodes(alike, alike) == []  # every node: exclude none


def test_the_report_is_one_page_and_listed(tmp_path: Path) -> None:
    ranks = [RankInfo(0, "n1", 6, "data", 11.0, 100, "in collective all_reduce | x", True, "py-spy 0.4.3", "n1-0.txt"),
             RankInfo(1, "n2")]
    text = render("hang", "job 77, restart 0: no progress", ranks, [ranks[1]], "wrote no heartbeat", "requeued.",
                  "by the watchdog on n1 at 20261203T000000Z")
    assert text.startswith("# Hang: job 77") and "**Suspect:** rank 1 on node n2: wrote no heartbeat." in text
    assert "| 0 | n1 | 100 | 6 | data | 11.0 s ago | in collective all_reduce / x | n1-0.txt (py-spy 0.4.3) |" in text
    assert "| 1 | n2 | - | - | - | - | - | none |" in text and len(text.splitlines()) < 40
    (tmp_path / "20261203T000000Z").mkdir()
    (tmp_path / "20261203T000000Z" / "report.md").write_text(text)
    [summary] = list_reports(tmp_path)
    assert summary.suspect.startswith("rank 1 on node n2") and summary.action == "requeued."
    assert list_reports(tmp_path / "missing") == []


@pytest.mark.parametrize(("cfg", "restart", "slurm", "kind", "why"), [
    ({}, 0, "77", "requeue", ""),
    ({}, 3, "77", "cancel", "restart limit reached (3 of 3)"),
    ({"requeue_enabled": False}, 0, "77", "cancel", "requeue is off"),
    ({"on_hang": "cancel"}, 0, "77", "cancel", "on_hang: cancel"),
    ({"on_hang": "report"}, 0, "77", "report", "on_hang: report, the job runs on"),
    ({}, 0, "", "cancel", "not under Slurm: nothing can requeue it"),
])
def test_the_action_plan_counts_restarts_like_the_batch_script(cfg: dict, restart: int, slurm: str, kind: str,
                                                               why: str) -> None:
    c = WatchConfig(**{**CFG.__dict__, **cfg})
    action = hangaction.plan(c, Layout("77", restart, 1, ("n1", "n2"), slurm), ["n2", "bad name;rm"])
    assert (action.kind, action.why) == (kind, why)
    if kind == "requeue":
        assert action.exclude == ("n2",)  # a name that is no node name never reaches scontrol
        assert "requeued with node n2 excluded (restart 1 of 3)" in action.describe()


def test_the_exclusion_helper_refuses_odd_arguments() -> None:
    from hpcqwen import exclude

    assert exclude.main(["77;rm", "n2"]) == 2 and exclude.main(["77", "n2 n3"]) == 2 and exclude.main(["77"]) == 2
    assert exclude.field("JobId=7 ExcNodeList=(null) JobState=PENDING", "ExcNodeList") == ""
    assert exclude.field("JobId=7 ExcNodeList=n3 JobState=PENDING", "JobState") == "PENDING"
    show = "JobId=7 JobState=PENDING Partition=debug NumNodes=2 ExcNodeList=n3"
    assert exclude.keep_runnable(show, ["n1"], 4) == ["n3", "n1"]
    assert exclude.keep_runnable(show, ["n1"], 3) == ["n1"]  # n3 and n1 out would leave 1 node of 3 for 2
    assert exclude.keep_runnable(show, ["n1", "n2"], 3) == []  # never a job that cannot start


def test_heartbeats_are_rate_limited_but_save_is_written_at_once(tmp_path: Path) -> None:
    hb = heartbeat.Heartbeat(tmp_path / "n1-0.json", "77", 0, 0, "n1", interval_s=60.0)
    hb.beat("data", 1)
    first = json.loads(hb.path.read_text())
    for step in range(2, 50):
        hb.beat("forward", step)
    assert json.loads(hb.path.read_text()) == first  # within the interval: not written
    hb.beat("save", 49)
    assert json.loads(hb.path.read_text())["phase"] == "save"  # the allowance changes: written at once
    hb.beat("data", 49)
    assert json.loads(hb.path.read_text())["phase"] == "data"
    for w in (0.1, 0.2, 0.3):
        hb.add_work(w)
        hb.end_step()
    assert hb.work_s == pytest.approx(0.2)
    assert heartbeat.read_all(tmp_path, "77", 0)[0]["step"] == 49 and heartbeat.read_all(tmp_path, "77", 1) == {}


SLEEPER = """
import faulthandler, os, signal, sys, time
f = open(sys.argv[1], "a")
faulthandler.register(signal.SIGRTMIN + 6, file=f, all_threads=True, chain=False)
def sleep_forever():
    time.sleep(600)
print("ready", flush=True)
sleep_forever()
"""


def test_stacks_of_a_real_process_by_py_spy_and_by_faulthandler(tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    stacks_file = tmp_path / "n1-0.stacks"
    proc = subprocess.Popen([sys.executable, str(script), str(stacks_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.3)
        r = stacks.LocalRank(0, proc.pid, stacks_file, int(heartbeat.DUMP_SIGNAL))
        text, tool = stacks.dump_with_py_spy(proc.pid)
        assert tool.startswith("py-spy") and stacks.where(stacks.main_thread(text))[0].startswith("in sleep_forever")
        text, tool = stacks.dump_with_faulthandler(r)
        assert tool.startswith("faulthandler") and "sleep_forever" in text
        where, waiting = stacks.where(stacks.main_thread(text))
        assert where.startswith("in sleep_forever (") and not waiting
        assert proc.poll() is None  # the dump signal did not kill it
        tools = stacks.write_dumps([r], tmp_path, "n1")
        assert tools[0].startswith("py-spy") and (tmp_path / "n1-0.txt").read_text().startswith("# stacks of rank 0")
    finally:
        proc.kill()
        proc.wait()


def test_a_collective_is_named_with_its_caller() -> None:
    frames = [stacks.Frame("all_reduce", "/v/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", 9),
              stacks.Frame("wrapper", "/v/lib/python3.11/site-packages/torch/distributed/c10d_logger.py", 3),
              stacks.Frame("agree", "/w/hpcqwen/stopping.py", 118)]
    assert stacks.where(frames) == ("in collective all_reduce (torch/distributed/distributed_c10d.py:9) called from "
                                    "agree (hpcqwen/stopping.py:118)", True)


def test_spec_section_bounds_and_cross_checks(write_spec) -> None:
    from hpcqwen.spec import load_spec

    spec = load_spec(write_spec("name: a\ntask: {kind: command, module: m}\n"))
    assert (spec.watchdog.enabled, spec.watchdog.hang_timeout_s, spec.watchdog.on_hang) == (True, 900, "requeue")
    with pytest.raises(SpecError) as e:
        load_spec(write_spec("name: a\nwatchdog: {hang_timeout_s: 5, poll_interval_s: 10, save_timeout_s: 2,"
                             " on_hang: kill, straggler_ratio: .nan}\ntask: {kind: command, module: m}\n"))
    text = e.value.render()
    assert "watchdog.on_hang" in text and "watchdog.straggler_ratio" in text
    with pytest.raises(SpecError) as e:
        load_spec(write_spec("name: a\nwatchdog: {hang_timeout_s: 5, poll_interval_s: 10, save_timeout_s: 2}\n"
                             "task: {kind: command, module: m}\n"))
    text = e.value.render()
    assert "watchdog.hang_timeout_s" in text and "must be longer than watchdog.poll_interval_s" in text
    assert "watchdog.save_timeout_s" in text and "must be at least watchdog.hang_timeout_s" in text


def test_collective_timeouts_outlast_every_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CFG.collective_timeout_s == 100 + 120 and CFG.heartbeat_interval_s == 1.0
    env = hangaction_env = __import__("hpcqwen.watchconfig", fromlist=["rank_env"]).rank_env(CFG, "n1")
    assert env == {"HPCQWEN_WATCHDOG": "1", "HPCQWEN_HEARTBEAT_INTERVAL_S": "1", "HPCQWEN_NODE_NAME": "n1",
                   "HPCQWEN_COLLECTIVE_TIMEOUT_S": "220"} == hangaction_env
    monkeypatch.setenv(heartbeat.ENV_TIMEOUT, "220")
    assert heartbeat.collective_timeout_s(1800) == 220.0
    monkeypatch.delenv(heartbeat.ENV_TIMEOUT)
    assert heartbeat.collective_timeout_s(1800) == 1800.0


def test_the_monitor_alert() -> None:
    data = {"poll_s": 1, "oldest": {"rank": 1, "host": "n2", "step": 6, "phase": "backward", "age_s": 5.0,
                                    "allowance_s": 10}, "stragglers": [{"rank": 1, "host": "n2", "ratio": 3.1}]}
    assert watchview.alert_of(data, 0.5) == ("STALLED 5s: no heartbeat from rank 1 (n2) in backward at step 6 · "
                                             "straggler: rank 1 (n2) 3.1x the median")
    assert watchview.alert_of({**data, "stragglers": [], "oldest": {**data["oldest"], "age_s": 1.0}}, 0.0) == ""
    assert watchview.alert_of("garbage", 0.0) == "" and watchview.stalled_after(900, 10) == 300


def test_launcher_two_nodes_here_hang_dumped_reported_and_ended(write_spec, tmp_path: Path) -> None:
    """Two launchers on this machine (SLURM_NODEID 0 and 1, no Slurm: the action is to end the run), each rank a
    gloo all_reduce loop that beats; rank 1 hangs at step 3 (test hook)."""
    spec = write_spec("""
        name: wdlocal
        resources: {nodes: 2, nproc_per_node: 1}
        watchdog: {hang_timeout_s: 3, startup_timeout_s: 30, save_timeout_s: 30, poll_interval_s: 0.5}
        task: {kind: command, module: hpcqwen.examples.beating, args: ['--steps', '400']}
    """)
    from hpcqwen.paths import RunPaths
    from hpcqwen.spec import load_spec

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(load_spec(spec).model_dump_json())
    # SLURM_JOB_ID empty: the launchers read the layout from SLURM_*, but no Slurm job can be requeued
    hosts = ["localhost", "127.0.0.1"]  # two names of this machine: node 0 is the rendezvous address
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_JOB_ID": "",
           "HPCQWEN_TEST_FAULT": "hang:rank=1:step=3", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": ",".join(hosts), "HPCQWEN_MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "hpcqwen", "launch", str(run_dir)],
                              env={**env, "SLURM_NODEID": str(n), "SLURMD_NODENAME": hosts[n]},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[0].returncode == 124, outs[0][-3000:]
    task = RunPaths(run_dir).task(None)
    [report] = list(task.hangs.glob("*/report.md"))
    text = report.read_text()
    assert "**Suspect:** rank 1 on node 127.0.0.1: not in a collective" in text, text
    assert "cancelled (not under Slurm" in text
    assert task.outcome.read_text().startswith("hung hang ") and task.final.read_text().startswith("HUNG hang")
    assert "sleep_forever" in (report.parent / "127.0.0.1-1.txt").read_text()
    assert "all_reduce" in (report.parent / "localhost-0.txt").read_text()
    assert procs[1].returncode != 0  # node 1's launcher killed its hung rank on the watcher's order


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_report_and_no_action_when_the_ranks_move_on_while_their_stacks_are_taken(tmp_path: Path) -> None:
    """A slow phase, not a hang: the verdict comes, but the re-check after the dumps sees progress."""
    from hpcqwen.paths import TaskPaths
    from hpcqwen.watchdog import Watcher

    task = TaskPaths(tmp_path)
    task.heartbeats.mkdir()
    task.hangs.mkdir()
    beats = [heartbeat.Heartbeat(task.heartbeats / f"n{r + 1}-{r}.json", "77", 0, r, f"n{r + 1}", 60.0)
             for r in (0, 1)]
    for b in beats:
        b.beat("data", 5, force=True)
    now = [0.0]
    killed: list[int] = []

    def move_on() -> list[stacks.LocalRank]:  # this node's "ranks" progress while the dumps are asked for
        for b in beats:
            b.beat("forward", 6, force=True)
        now[0] += 0.5
        return []
    responder = stacks.Responder(task.hangs, "n1", "77", 0, move_on, lambda: killed.append(1), 0.05)
    responder.start()
    w = Watcher(CFG, LAYOUT, task, lambda: killed.append(1), "n1", clock=lambda: now[0])
    w.dump_wait_s = 1.0
    try:
        for t in range(1, 13):
            now[0] = float(t)
            w.poll()
    finally:
        responder.stopped.set()
    assert killed == [] and w.outcome is None and not task.outcome.exists()
    assert list(task.hangs.glob("*/report.md")) == [] and not w.acted


def test_a_prepare_job_is_not_watched(write_spec, tiny_qwen3_dir: Path) -> None:
    """`hpcqwen prepare` runs the runner until its data cache is built: no training step ever comes."""
    from hpcqwen.cli.prepare import prepare_spec
    from hpcqwen.spec import load_spec

    data = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"
    spec = load_spec(write_spec(f"name: p\ntask: {{kind: sft, model: {tiny_qwen3_dir}, dataset: [{data}]}}\n"))
    assert spec.watchdog.enabled and not prepare_spec(spec).watchdog.enabled
