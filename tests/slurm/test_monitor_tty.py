"""The full-screen `hpcqwen queue` in a real terminal (tmux send-keys / capture-pane) on the real
local Slurm cluster: it renders, filters, expands an array, opens a log tail that follows, and
cancels a job only after a yes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monitor_helpers import MonitorJobs, Tmux, fake_train, slurm_state, submit, wait_until

pytestmark = pytest.mark.slurm


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return int(json.loads(lines[-1])["step"]) if lines else 0


def filter_to(tmux: Tmux, name: str) -> str:
    """Type `/NAME` and Enter; returns the screen once the filter is applied."""
    tmux.send("/")
    tmux.wait_for(lambda s: "filter by name:" in s, 10, "the filter prompt")
    tmux.send("-l", name)
    tmux.send("Enter")
    return tmux.wait_for(lambda s: "filter by name:" not in s and f"filter: '{name}'" in s, 10, "the filter")


def test_live_view_renders_follows_a_log_expands_an_array_and_cancels_after_yes(
        monitor_jobs: MonitorJobs, tmux: Tmux, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    victim_name = f"mon{monitor_jobs.tag}-victim"
    victim, victim_dir = submit(root, victim_name, "resources: {time_limit_min: 10}\n" + fake_train(300, 1.0))
    wait_until(lambda: steps_logged(victim_dir) >= 2, 120, "the victim to log 2 steps")
    wait_until(lambda: steps_logged(monitor_jobs.arr_dir / "tasks" / "1") >= 1, 180, "array task 1 to start")
    wait_until(lambda: steps_logged(monitor_jobs.sft_dir) >= 2, 180, "the SFT to log a training step")

    tmux.start(["queue", "--interval", "5", "--name", monitor_jobs.pattern, "--run-root", str(monitor_jobs.root)],
               {"HPCQWEN_CACHE_DIR": str(tmp_path / "cache")})
    screen = tmux.wait_for(lambda s: victim_name in s and monitor_jobs.names["arr"] in s, 30, "the first frame")
    assert screen.startswith("hpcqwen queue · ") and "RUN " in screen and "↑↓/jk move" in screen
    sft_line = next(ln for ln in screen.splitlines() if monitor_jobs.names["sft"] in ln)
    assert "RUNNING" in sft_line and re.search(r"\d+/200", sft_line)

    # the log tail of the selected job, followed as it grows
    filter_to(tmux, victim_name)
    tmux.send("l")
    log = tmux.wait_for(lambda s: s.startswith("log: ") and "fake_train: step" in s, 15, "the log view")
    assert f"{victim_name}-{victim}.out" in log.splitlines()[0]
    last = max(int(n) for n in re.findall(r"fake_train: step (\d+)", log))
    tmux.wait_for(lambda s: f"fake_train: step {last + 2}" in s, 15, "new log lines")
    tmux.send("q")
    tmux.wait_for(lambda s: s.startswith("hpcqwen queue"), 10, "back to the table")

    # cancel asks first; anything but y keeps the job
    tmux.send("c")
    tmux.wait_for(lambda s: f"cancel {victim}? y/N" in s, 10, "the question")
    tmux.send("n")
    tmux.wait_for(lambda s: "not cancelled" in s, 10, "no cancel")
    assert slurm_state(victim) == "RUNNING"
    tmux.send("c")
    tmux.wait_for(lambda s: f"cancel {victim}? y/N" in s, 10, "the question again")
    tmux.send("y")
    tmux.wait_for(lambda s: f"cancelled {victim}" in s, 15, "the cancel")
    wait_until(lambda: slurm_state(victim) == "CANCELLED", 30, "Slurm to record the cancel")
    tmux.wait_for(lambda s: re.search(rf"{victim}\s+CANCELLED", s) is not None, 30, "the view to show it")

    # the array: one line, expanded on Enter, each task's own log
    tmux.send("Escape")  # a fresh filter
    screen = filter_to(tmux, monitor_jobs.names["arr"])
    assert "└ task" not in screen and f"▸ {monitor_jobs.names['arr']}" in screen
    tmux.send("Enter")
    screen = tmux.wait_for(lambda s: "└ task 3" in s, 10, "the expanded array")
    assert [t for t in range(4) if f"└ task {t}" in screen] == [0, 1, 2, 3]
    assert re.search(rf"└ task 2\s+{monitor_jobs.arr}_2\s+PENDING.*array throttle", screen)
    tmux.send("Down")
    tmux.send("Down")
    tmux.send("l")
    log = tmux.wait_for(lambda s: s.startswith("log: "), 15, "task 1's log")
    assert f"{monitor_jobs.names['arr']}-{monitor_jobs.arr}_1.out" in log.splitlines()[0]
    tmux.send("Escape")
    tmux.wait_for(lambda s: s.startswith("hpcqwen queue"), 10, "back to the table")

    tmux.send("q")
    tmux.wait_for(lambda s: "EXIT=0" in s, 15, "a clean exit")
    assert "Traceback" not in tmux.screen() + tmux.stderr()
