"""GPU-hour accounting: sacct's incarnations, and the split of each into start-up, steps kept/lost, saving."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from hpcqwen.cost import (
    CATEGORIES,
    TaskLog,
    gpus_of_tres,
    parse_incarnations,
    read_task_log,
    split_incarnation,
    task_breakdown,
)

# `sacct --duplicates -X --parsable2 --format=JobID,JobIDRaw,State,Start,End,AllocTRES,NNodes` as Slurm 22.05
# printed it on the local cluster: a job requeued twice, an array with a requeued task and a pending range.
SACCT = """\
12|12|REQUEUED|2026-12-03T18:28:38|2026-12-03T18:29:33|billing=1,cpu=1,gres/gpu=2,node=1|1
12|12|REQUEUED|2026-12-03T18:29:48|2026-12-03T18:30:01|billing=1,cpu=1,gres/gpu=2,node=1|1
12|12|COMPLETED|2026-12-03T18:30:15|2026-12-03T18:31:15|billing=1,cpu=1,gres/gpu=2,node=1|1
7_1|9|REQUEUED|2026-12-03T18:27:31|2026-12-03T18:27:35|billing=1,cpu=1,node=1|1
7_1|9|RUNNING|2026-12-03T18:27:48|Unknown|billing=1,cpu=1,node=1|1
7_[2-5]|7|PENDING|Unknown|Unknown||1
"""


def _t(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def test_sacct_rows_become_incarnations() -> None:
    incs = parse_incarnations(SACCT, {"7": 100})
    assert [(i.job_id, i.task, i.state, i.gpus) for i in incs] == [
        ("12", None, "REQUEUED", 2), ("12", None, "REQUEUED", 2), ("12", None, "COMPLETED", 2),
        ("7_1", 101, "REQUEUED", 0), ("7_1", 101, "RUNNING", 0)]  # the chunk's offset applied; pending left out
    assert incs[0].end - incs[0].start == 55 and incs[-1].end is None
    assert gpus_of_tres("billing=8,cpu=8,gres/gpu=4,node=2") == 4 and gpus_of_tres("cpu=1") == 0


LOG = TaskLog(begins=[100.0, 220.0], lines=[100.0, 130.0, 160.0, 220.0, 250.0, 290.0],
              saves=[(150.0, 5.0), (180.0, 6.0), (280.0, 4.0)], launches=[], tokens=9000)


def test_a_requeued_incarnation_loses_what_came_after_its_last_save() -> None:
    parts = split_incarnation(90.0, 200.0, LOG, final=False)
    assert parts == {"startup": 10.0, "steps_kept": 69.0, "steps_lost": 20.0, "saving": 11.0, "other": 0.0}
    last = split_incarnation(210.0, 300.0, LOG, final=True)
    assert last == {"startup": 10.0, "steps_kept": 66.0, "steps_lost": 0.0, "saving": 4.0, "other": 10.0}
    never = split_incarnation(400.0, 430.0, LOG, final=True)  # no step in it: all start-up
    assert never["startup"] == 30.0 and sum(never.values()) == 30.0


def test_the_categories_add_up_to_the_allocation_for_any_gpus() -> None:
    incs = parse_incarnations(SACCT, {})[:3]
    base = incs[0].start
    log = TaskLog([base + 10, base + 80, base + 105], [base + 10, base + 40, base + 80, base + 105, base + 150],
                  [(base + 50, 3.0), (base + 150, 2.0)], [], 1000)
    br = task_breakdown(incs, log, now=base + 10_000)
    assert sum(br.wall_s.values()) == pytest.approx(55 + 13 + 60)
    assert sum(br.gpu_s.values()) == pytest.approx(2 * (55 + 13 + 60)) and br.incarnations == 3
    data = br.as_json()
    assert data["allocated_gpu_hours"] == pytest.approx(sum(data["gpu_hours"][c] for c in CATEGORIES), abs=1e-5)
    assert data["tokens_per_gpu_hour"] == pytest.approx(1000 / (2 * 128 / 3600), rel=1e-3)


def test_the_run_dir_is_read_as_times(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    lines = [{"step": 0, "phase": "train", "tokens_seen": 0, "time": 10.0},
             {"step": 2, "phase": "train", "loss": 1.0, "tokens_seen": 64, "time": 20.0},
             {"step": 2, "phase": "eval", "eval_loss": 1.2, "time": 21.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')
    (tmp_path / "checkpoints" / "saves.jsonl").write_text(json.dumps({"step": 2, "time": 22.0, "save_s": 1.5}) + "\n")
    (tmp_path / "launches.jsonl").write_text(json.dumps({"time": "2026-12-03T18:00:00+00:00", "job_id": "5"}) + "\n")
    log = read_task_log(tmp_path)
    assert (log.begins, log.lines, log.saves, log.tokens) == ([10.0], [10.0, 20.0, 21.0], [(22.0, 1.5)], 64)
    assert log.launches == [_t("2026-12-03T18:00:00+00:00")]
