"""The monitor's frame as text: golden frames for a fixed set of rows, and the pieces they are made of.

Regenerate the goldens with HPCQWEN_UPDATE_GOLDEN=1 after an intended change, and read the diff.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from hpcqwen.monitor import Progress, RunRow, TaskRow
from hpcqwen.monitor_live import parse_keys
from hpcqwen.monitor_view import (
    dependency_words,
    filter_rows,
    fmt_age,
    layout,
    lines_of,
    reason_words,
    render_table,
    sort_rows,
    sparkline,
    window,
)
from hpcqwen.polling import PollStatus

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NOW = 1_800_000_000.0
LOSSES = tuple(round(2.4 * 0.93**i + 0.3, 4) for i in range(30))


def fixed_rows() -> list[RunRow]:
    """One row of every kind the monitor must show."""
    def task(i: int, state: str, step: int | None = None, reason: str = "") -> TaskRow:
        prog = Progress(step=step, total_steps=100, loss=1.0 - step / 200, losses=LOSSES[:step // 10 + 2],
                        tokens_per_s=900.0, steps_per_s=0.5, updated_at=NOW - 10) if step is not None else None
        return TaskRow(i, f"205_{i}", state, reason, 600.0 if step else None, prog,
                       step - step % 50 if step else None, NOW - 300 if step and step >= 50 else None)
    return [
        RunRow("qwen3-8b-sft", "201", "/runs/qwen3-8b-sft/a", "RUNNING", nodes=2, gpus_per_node=8,
               nodelist="n[1-2]", elapsed_s=3600.0, elapsed_at=NOW - 30, time_limit_s=4 * 3600.0, restarts=1,
               progress=Progress(step=1200, total_steps=5000, loss=0.9123, losses=LOSSES, tokens_per_s=45210.0,
                                 steps_per_s=0.5, updated_at=NOW - 20, phase="train"),
               checkpoint_step=1000, checkpoint_at=NOW - 600, submitted_at=NOW - 4000),
        RunRow("qwen3-0.6b-grpo", "202", "/runs/grpo/b", "RUNNING", nodes=1, gpus_per_node=4, elapsed_s=6600.0,
               elapsed_at=NOW, time_limit_s=7200.0,
               progress=Progress(step=100, total_steps=500, loss=0.0123, losses=(0.2, 0.1, 0.05, 0.0123),
                                 reward_mean=0.5125, tokens_per_s=812.0, steps_per_s=0.05, updated_at=NOW - 5),
               checkpoint_step=100, checkpoint_at=NOW - 60, submitted_at=NOW - 8000),
        RunRow("distill-gen", "203", "/runs/distill/c", "RUNNING", nodes=1, gpus_per_node=8, elapsed_s=60.0,
               elapsed_at=NOW, time_limit_s=3600.0,
               progress=Progress(step=150, total_steps=625, done=1200, total=5000, shards_done=3, steps_per_s=2.5,
                                 phase="generate", updated_at=NOW - 900), submitted_at=NOW - 70),
        RunRow("sft-after", "204", "/runs/sft-after/d", "PENDING", reason="Dependency",
               dependency="afterok:201(unfulfilled)", nodes=2, gpus_per_node=8, time_limit_s=3600.0,
               submitted_at=NOW - 100),
        RunRow("sweep-lr", "205", "/runs/sweep/e", "RUNNING", array_size=6, nodes=1, gpus_per_node=1,
               elapsed_s=600.0, elapsed_at=NOW, time_limit_s=3600.0,
               tasks=(task(0, "COMPLETED", 100), task(1, "RUNNING", 60), task(2, "RUNNING", 20),
                      task(3, "PENDING", reason="JobArrayTaskLimit"), task(4, "OUT_OF_MEMORY", 10),
                      task(5, "PENDING", reason="JobArrayTaskLimit")),
               progress=Progress(step=190, total_steps=400, tokens_per_s=1800.0), submitted_at=NOW - 200),
        RunRow("big-node", "206", "/runs/big/f", "PENDING", reason="Resources", nodes=16, gpus_per_node=8,
               time_limit_s=86400.0, submitted_at=NOW - 50),
        RunRow("queued", "207", "/runs/q/g", "PENDING", reason="Priority", nodes=1, gpus_per_node=8,
               submitted_at=NOW - 40),
        RunRow("held", "208", "/runs/h/h", "PENDING", reason="JobHeldUser", nodes=1, submitted_at=NOW - 30),
        RunRow("orphan", "209", "/runs/o/i", "PENDING", reason="DependencyNeverSatisfied",
               dependency="afterok:190_*(failed)", nodes=1, submitted_at=NOW - 20),
        RunRow("new-state", "210", "/runs/n/j", "FUTURE_STATE", reason="SomethingNew", submitted_at=NOW - 900),
        RunRow("timed-out", "199", "/runs/t/k", "TIMEOUT", nodes=1, elapsed_s=3600.0, time_limit_s=3600.0,
               restarts=3, source="sacct", checkpoint_step=700, checkpoint_at=NOW - 7200, submitted_at=NOW - 90000),
        RunRow("done", "198", "/runs/d/l", "COMPLETED", nodes=1, elapsed_s=1200.0, time_limit_s=3600.0,
               progress=Progress(step=300, total_steps=300, loss=0.41, losses=LOSSES[-10:], phase="done"),
               source="sacct", submitted_at=NOW - 80000),
        RunRow("lost", "197", "/runs/x/m", "UNKNOWN", reason="NotInQueue", source="none", submitted_at=NOW - 5000),
    ]


def frame_text(renderable: object, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.export_text()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPCQWEN_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with HPCQWEN_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


OK = PollStatus(fetched_at=NOW - 12, attempted_at=NOW - 12, next_at=NOW + 18)
DEAD = PollStatus(fetched_at=NOW - 130, attempted_at=NOW - 10, strikes=2, next_at=NOW + 110, error_since=NOW - 70,
                  error="the Slurm controller does not answer: slurm_load_jobs error: Unable to contact slurm "
                        "controller (connect failure)")


def test_golden_frame_wide() -> None:
    frame = render_table(fixed_rows(), NOW, 200, status=OK, interval_s=30, expanded={"205"})
    check_golden("monitor_frame_200.txt", frame_text(frame, 200))


def test_golden_frame_narrow_with_dead_controller() -> None:
    frame = render_table(fixed_rows(), NOW, 110, status=DEAD, interval_s=30, selected=2, height=10,
                         footer="↑↓/jk move · q quit")
    text = frame_text(frame, 110)
    check_golden("monitor_frame_110_dead.txt", text)
    assert "Slurm controller not answering for 1m" in text and "showing data from 2m ago" in text


def test_frame_shows_what_the_issue_asks_for() -> None:
    text = frame_text(render_table(fixed_rows(), NOW, 200, status=OK, expanded={"205"}), 200)
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
    assert "waiting for job 201 to succeed" in line["sft-after"]
    assert "waiting for free nodes/GPUs" in line["big-node"]
    assert "queued behind higher-priority jobs" in line["held"] or "held by its user" in line["held"]
    assert "can never start: array 190 did not succeed (cancel it)" in line["orphan"]
    assert "FUTURE_STATE" in line["new-state"] and "SomethingNew" in line["new-state"]  # verbatim
    assert "1200/5000" in line["qwen3-8b-sft"] and "0.9123" in line["qwen3-8b-sft"]
    assert "1000 10m" in line["qwen3-8b-sft"] and "1h00m/4h00m" in line["qwen3-8b-sft"]
    assert "⚠ won't finish" in line["qwen3-0.6b-grpo"] and "0.512" in line["qwen3-0.6b-grpo"]  # reward column
    assert "3sh 1.2k/5.0k" in line["distill-gen"] and "no metrics for 15m" in line["distill-gen"]
    assert "✓●●○?○" not in text  # OUT_OF_MEMORY folds to failed
    assert "✓●●○✗○ 2● 2○ 1✗ 1✓" in line["▾"]
    assert sum(1 for ln in text.splitlines() if "└ task" in ln) == 6


def test_collapsed_array_is_one_line() -> None:
    text = frame_text(render_table(fixed_rows(), NOW, 170), 170)
    assert "└ task" not in text and "▸ sweep-lr" in text


def test_elapsed_ticks_for_running_jobs_only() -> None:
    rows = fixed_rows()
    assert rows[0].elapsed_now(NOW) == 3630.0 and rows[0].elapsed_now(NOW + 60) == 3690.0
    assert rows[10].elapsed_now(NOW + 60) == 3600.0


def test_only_the_visible_window_is_laid_out() -> None:
    rows = fixed_rows() * 50
    text = frame_text(render_table(rows, NOW, 120, height=5, selected=300), 120)
    assert "lines 299-303 of 650" in text
    assert window(650, 0, 5) == (0, 5) and window(650, 649, 5) == (645, 650) and window(3, 2, 10) == (0, 3)


def test_reason_words() -> None:
    assert reason_words("Resources") == "waiting for free nodes/GPUs"
    assert reason_words("JobHeldAdmin") == "held by an administrator"
    assert reason_words("QOSMaxGRESPerUser") == "QOS limit reached (QOSMaxGRESPerUser)"
    assert reason_words("Dependency", "afterany:5_*(unfulfilled),afterok:7(unfulfilled)") == \
        "waiting for array 5 to end; waiting for job 7 to succeed"
    assert reason_words("BrandNewReason") == "BrandNewReason"
    assert dependency_words("singleton(unfulfilled)") == "singleton(unfulfilled)"
    assert reason_words("DependencyNeverSatisfied", "afterok:3(failed),afterany:4(unfulfilled)") == \
        "can never start: job 3 did not succeed (cancel it)"


def test_sparkline_and_ages() -> None:
    assert sparkline([3, 2, 1]) == "█▄▁" and sparkline([1.0]) == "" and sparkline([2, 2]) == "▄▄"
    assert len(sparkline(list(range(100)), 6)) == 6
    assert [fmt_age(s) for s in (5, 125, 3725, 90000)] == ["5s", "2m", "1h02m", "1d01h"]


def test_layout_drops_the_least_important_columns_first() -> None:
    natural = {"RUN": 15, "JOB": 5, "STATE": 9, "DETAIL": 40, "N×GPU": 5, "TIME": 11, "RST": 3, "STEP": 9,
               "LOSS": 12, "TOK/S": 5, "ETA": 7, "CKPT": 8}
    wide = layout(natural, 200)
    assert set(wide) == set(natural) and wide["DETAIL"] == 40
    narrow = layout(natural, 100)
    assert "RST" not in narrow and "CKPT" not in narrow and {"RUN", "STATE", "STEP", "ETA"} <= set(narrow)
    assert sum(narrow.values()) + 2 * (len(narrow) - 1) <= 100


def test_filters_and_order() -> None:
    rows = fixed_rows()
    assert [r.name for r in filter_rows(rows, name="qwen3-*")] == ["qwen3-8b-sft", "qwen3-0.6b-grpo"]
    assert [r.name for r in filter_rows(rows, name="sft")] == ["qwen3-8b-sft", "sft-after"]
    assert {r.name for r in filter_rows(rows, states=["pending"])} == {"sft-after", "big-node", "queued", "held",
                                                                       "orphan", "sweep-lr"}
    assert [r.name for r in filter_rows(rows, states=["FAILED"])] == ["timed-out"]  # folded state
    assert [r.name for r in filter_rows(rows, states=["TIMEOUT"])] == ["timed-out"]  # Slurm's word
    order = [r.name for r in sort_rows(rows)]
    assert order[:4] == ["distill-gen", "sweep-lr", "qwen3-8b-sft", "qwen3-0.6b-grpo"]
    assert order[-1] == "done"
    assert len(lines_of(sort_rows(rows), {"205"})) == len(rows) + 6


@pytest.mark.parametrize(("typed", "keys"), [
    ("jjk", ["j", "j", "k"]), ("\x1b[A\x1b[B", ["up", "down"]), ("\x1b", ["esc"]), ("\r/ab\x7f", ["enter", "/", "a",
                                                                                                 "b", "backspace"]),
    ("\x1b[5~\x1b[6~q", ["pgup", "pgdn", "q"]),
])
def test_parse_keys(typed: str, keys: list[str]) -> None:
    assert parse_keys(typed) == keys
