"""The hang and straggler watchdog on the real local Slurm cluster (3 nodes), 2-node SFT of the tiny Qwen3 on
gloo: a hang (test-only hook: rank 1 sleeps at step 6 while rank 0 waits in a collective) is found within
hang_timeout + one poll, every rank's stack is dumped, the report names node n2, the job is requeued with n2
excluded and finishes on the other nodes with every step once; a killed rank fails the attempt in seconds; a
node whose launcher never starts is a stuck start, requeued; a 3× slower rank is reported as a straggler and
nothing else happens; a save longer than hang_timeout is not a hang."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until
from signal_helpers import log_of, submit

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK
from hpcqwen.metrics import read_metrics
from hpcqwen.monitor import Watch

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_train]
DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"
POLL_S = 1.0
HANG_S = 10


def sft_spec(write_spec, name: str, model: Path, steps: int = 20, save_steps: int = 4, startup_s: int = 150,
             nodes: int = 2) -> Path:
    return write_spec(f"""
        name: {name}
        resources: {{nodes: {nodes}, nproc_per_node: 1, time_limit_min: 20}}
        watchdog: {{hang_timeout_s: {HANG_S}, startup_timeout_s: {startup_s}, save_timeout_s: 120,
                    poll_interval_s: {POLL_S}}}
        task:
          kind: sft
          model: {model}
          dataset: [{DATA}]
          torch_dtype: float32
          max_steps: {steps}
          save_steps: {save_steps}
          logging_steps: 1
          per_device_train_batch_size: 2
          gradient_accumulation_steps: 1
          learning_rate: 5e-3
          max_length: 128
          gradient_checkpointing: false
    """, f"{name}.yaml")


def train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m.get("phase") == "train" and "loss" in m]


def nodes_of(log: str) -> list[dict[int, str]]:
    """Node rank -> node name of each attempt, from the launchers' summary lines ("restart 0 node 1/2 (n3)")."""
    attempts: dict[int, dict[int, str]] = {}
    for restart, node, host in re.findall(r"restart (\d+) node (\d+)/\d+ \((\w+)\)", log):
        attempts.setdefault(int(restart), {})[int(node)] = host
    return [attempts[k] for k in sorted(attempts)]


def queue_alerts(run_dir: Path, alerts: list[str]) -> None:
    """The monitor's alert for the run, every half second, until the hang report exists (a thread)."""
    watch = Watch(run_dir.parents[1], 5.0, directory=run_dir.parent / ".squeue-cache")
    end = time.time() + 600
    while time.time() < end and not list((run_dir / "hangs").glob("*/report.md")):
        row = next((r for r in watch.refresh(force=True).rows if r.run_dir == str(run_dir)), None)
        if row is not None and row.alert:
            alerts.append(row.alert)
        time.sleep(0.5)


def test_two_node_hang_dumped_reported_requeued_without_the_node_and_finished(
        slurm_cluster: str, write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TEST_FAULT", "hang:rank=1:step=6")  # test-only hook, exported to the job by sbatch
    job, run_dir = submit(capsys, sft_spec(write_spec, "wd14-hang", tiny_qwen3_dir))
    alerts: list[str] = []
    watching = threading.Thread(target=queue_alerts, args=(run_dir, alerts), daemon=True)
    watching.start()
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    watching.join(timeout=5)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-4000:]
    # detected within hang_timeout + one poll of the hang's start (the hook wrote when it started sleeping)
    hang = json.loads((run_dir / ".fault-hang-1.json").read_text())
    reports = sorted((run_dir / "hangs").glob("*/report.md"))
    assert len(reports) == 1, reports
    first = nodes_of(log)[0]  # the nodes Slurm gave the first attempt (others' jobs share the cluster)
    n0, n1 = first[0], first[1]
    detected = json.loads((reports[0].parent / "verdict.json").read_text())["detected_wall"]
    # hang_timeout + one poll, plus 0.5 s for the watcher thread's scheduling on this loaded 2-core machine
    assert 0 < detected - hang["wall"] <= HANG_S + POLL_S + 0.5, (detected - hang["wall"], log[-3000:])
    report = reports[0].read_text()
    assert f"**Suspect:** rank 1 on node {n1}: not in a collective while the other ranks wait in one" in report, report
    assert f"requeued with node {n1} excluded" in report, report
    stack1 = (reports[0].parent / f"{n1}-1.txt").read_text()
    stack0 = (reports[0].parent / f"{n0}-0.txt").read_text()
    assert "by py-spy" in stack1 and "sleep_forever" in stack1 and "testing_faults.py" in stack1, stack1
    assert re.search(r"\b(all_reduce|all_gather|broadcast|barrier|_engine_run_backward)\b", stack0), stack0
    assert re.search(rf"\| 0 \| {n0} \| \d+ \| 6 \| .* in collective ", report), report
    # requeued (restart 1) on nodes other than the suspect, and finished with every step logged once
    assert n1 not in nodes_of(log)[1].values(), nodes_of(log)
    assert train_steps(run_dir) == list(range(1, 21)), train_steps(run_dir)
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["restart_count"] for x in launches] == [0, 1]
    resumed = [x for x in log.splitlines() if x.startswith("sft: resuming from ")]
    assert len(resumed) == 1 and resumed[0].endswith("checkpoint-4"), resumed
    # while it hung, the queue showed it STALLED with the age, the rank and the phase
    assert any(a.startswith("STALLED ") and "no heartbeat from rank" in a and "at step" in a for a in alerts), alerts
    # the CLI shows it
    assert main(["hangs", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert str(reports[0]) in out and f"rank 1 on node {n1}" in out
    assert main(["status", str(run_dir)]) == EXIT_OK
    assert f"hang      {reports[0]}" in capsys.readouterr().out


def test_a_killed_rank_ends_the_attempt_in_seconds(slurm_cluster: str, write_spec, tiny_qwen3_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job, run_dir = submit(capsys, sft_spec(write_spec, "wd14-kill", tiny_qwen3_dir, steps=40))
    def rank1_training() -> dict | None:
        for beat in (run_dir / "heartbeats").glob("*-1.json"):
            data = json.loads(beat.read_text())
            if data.get("source") == "rank" and (data.get("step") or 0) >= 5:
                return data
        return None
    pid = wait_until(rank1_training, 240, "rank 1 at step 5")["pid"]
    os.kill(pid, signal.SIGKILL)  # the local cluster's nodes share this machine's pid space
    killed = time.time()
    wait_until(lambda: len((run_dir / "launches.jsonl").read_text().splitlines()) >= 2, 120, "the requeued attempt")
    requeued = time.time() - killed
    assert requeued < 45, requeued  # not the time limit (20 min), nor the watchdog's hang_timeout path
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-3000:]
    assert "ranks ended failed (exit codes 137)" in log and "hpcqwen: failed; requeued" in log
    assert not list((run_dir / "hangs").glob("*/report.md"))  # a crash is not a hang


def test_a_node_that_never_starts_is_a_stuck_start_and_requeued_without_it(
        slurm_cluster: str, write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TEST_FAULT", "launch_delay:node=1:seconds=600")
    spec = sft_spec(write_spec, "wd14-start", tiny_qwen3_dir, steps=6, save_steps=3, startup_s=90)
    job, run_dir = submit(capsys, spec)
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-4000:]
    report = next((run_dir / "hangs").glob("*/report.md")).read_text()
    assert report.startswith("# Stuck start: ") and "did not reach their first step within startup_timeout_s" in report
    suspect = re.search(r"\*\*Suspect:\*\* rank 1 on node (\w+): wrote no heartbeat", report)
    assert suspect is not None, report
    bad = suspect.group(1)
    assert bad != nodes_of(log)[0][0] and bad not in nodes_of(log)[1].values(), (bad, nodes_of(log))
    assert f"requeued with node {bad} excluded" in report
    assert train_steps(run_dir) == list(range(1, 7))


def test_a_slow_rank_is_reported_as_straggler_and_nothing_else(
        slurm_cluster: str, write_spec, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TEST_FAULT", "slow:rank=1:factor=4")
    job, run_dir = submit(capsys, sft_spec(write_spec, "wd14-slow", tiny_qwen3_dir, steps=30, save_steps=100))

    def straggler_line() -> dict | None:
        return next((m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("event") == "straggler"), None)
    line = wait_until(straggler_line, 300, "a straggler line in metrics.jsonl")
    assert line["rank"] == 1 and line["ratio"] >= 2.0, line

    def queue_alert() -> str:
        assert main(["queue", "--once", "--json", "--run-root", str(run_dir.parents[1])]) == EXIT_OK
        data = json.loads(capsys.readouterr().out)
        return next(r for r in data["runs"] if r["run_dir"] == str(run_dir))["alert"]
    alert = wait_until(lambda: "straggler" in queue_alert() and queue_alert(), 60, "the straggler in the queue")
    assert f"straggler: rank 1 ({line['host']})" in str(alert), alert
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    assert [r.slurm_state for r in rows] == ["COMPLETED"]
    assert not (run_dir / "hangs").exists() or not list((run_dir / "hangs").glob("*/report.md"))
    assert train_steps(run_dir) == list(range(1, 31))


def test_a_save_longer_than_hang_timeout_is_not_a_hang(slurm_cluster: str, write_spec, tiny_qwen3_dir: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TEST_SAVE_PAUSE_S", str(HANG_S + 8))  # every save pauses past hang_timeout_s
    job, run_dir = submit(capsys, sft_spec(write_spec, "wd14-save", tiny_qwen3_dir, steps=8, save_steps=4))
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    log = log_of(run_dir)
    assert [r.slurm_state for r in rows] == ["COMPLETED"], log[-3000:]
    # no hang or stuck start (a straggler line may appear: on a loaded 2-core machine a rank can be slower)
    assert not [x for x in log.splitlines() if "hpcqwen watchdog:" in x and "straggler:" not in x], log[-3000:]
    assert not list((run_dir / "hangs").glob("*/report.md"))
    markers = [json.loads((run_dir / "checkpoints" / f"checkpoint-{s}" / "hpcqwen-complete.json").read_text())
               for s in (4, 8)]
    assert all(m["save_s"] > HANG_S for m in markers), markers  # the saves really outlasted hang_timeout_s
    assert len(nodes_of(log)) == 1  # one attempt



def test_two_node_grpo_with_a_tight_watchdog_never_fires(slurm_cluster: str, tiny_qwen3_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """GRPO's rollouts (forwards without gradients: phase `generate`) and saves keep the heartbeats moving."""
    spec = Path(__file__).resolve().parents[2] / "jobspecs" / "qwen3-tiny-grpo.yaml"
    sets = [f"task.model={tiny_qwen3_dir}", "resources.nodes=2", "resources.nproc_per_node=1", "task.max_steps=6",
            "task.save_steps=3", "task.max_completion_length=8", f"watchdog.hang_timeout_s={HANG_S}",
            f"watchdog.poll_interval_s={POLL_S}", "watchdog.startup_timeout_s=150", "watchdog.save_timeout_s=120"]
    rc = main(["submit", str(spec), "--wait", *[x for s in sets for x in ("--set", s)]])
    out, err = capsys.readouterr()
    run_dir = Path(out.splitlines()[0].split("  run dir: ")[1])
    log = log_of(run_dir)
    assert rc == EXIT_OK, err + log[-3000:]
    # no hang or stuck start (a straggler line may appear: on a loaded 2-core machine a rank can be slower)
    assert not [x for x in log.splitlines() if "hpcqwen watchdog:" in x and "straggler:" not in x], log[-3000:]
    assert not list((run_dir / "hangs").glob("*/report.md"))
    beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("*.json")]
    assert sorted((b["rank"], b["phase"], b["step"]) for b in beats) == [(0, "exited", 6), (1, "exited", 6)]


@pytest.mark.parametrize(("policy", "why"), [
    ("on_hang: cancel", "on_hang: cancel"),
    ("on_hang: requeue", "restart limit reached (0 of 0)"),  # with requeue.max_restarts 0: the same count
])
def test_a_hang_that_is_not_requeued_reads_hung(slurm_cluster: str, write_spec, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, policy: str, why: str) -> None:
    """A `command` module that beats (hpcqwen.examples.beating) on 2 nodes; rank 1 hangs at step 20."""
    monkeypatch.setenv("HPCQWEN_TEST_FAULT", "hang:rank=1:step=20")
    spec = write_spec(f"""
        name: wd14-hung
        resources: {{nodes: 2, nproc_per_node: 1, time_limit_min: 10}}
        requeue: {{max_restarts: 0}}
        watchdog: {{hang_timeout_s: 5, poll_interval_s: 0.5, {policy}}}
        task: {{kind: command, module: hpcqwen.examples.beating, args: ['--steps', '100000']}}
    """, "hung.yaml")
    rc = main(["submit", str(spec), "--wait"])
    out, err = capsys.readouterr()
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    assert rc == 3, err + log_of(run_dir)[-3000:]  # not COMPLETED: `submit --wait` says the job failed
    [report] = list((run_dir / "hangs").glob("*/report.md"))
    final = (run_dir / "FINAL").read_text()
    assert final == f"HUNG hang: {why}; report: {report}\n"
    assert (run_dir / "OUTCOME").read_text().startswith("hung hang ")
    assert main(["status", str(run_dir), "--json"]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert [t["state"] for t in status["tasks"]] == ["HUNG"] and status["hang_reports"] == [str(report)]
    assert f"the job was cancelled ({why}); its state reads HUNG." in report.read_text()
