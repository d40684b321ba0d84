"""`hpcqwen queue` for pipelines: one row per pipeline, its stages as labelled lines with what each waits for."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from hpcqwen.monitor import RunRow, TaskRow
from hpcqwen.monitor_view import render_table
from hpcqwen.pipeline.record import StageRecord, new_record, write_record
from hpcqwen.pipeline.rows import group_pipelines

NOW = 1_800_000_000.0


def _record(pdir: Path) -> dict[str, Path]:
    stages = {n: pdir / "stages" / n for n in ("distill", "sft", "grpo")}
    for d in stages.values():
        d.mkdir(parents=True)
    write_record(pdir, new_record("reason", "p.yaml", "0" * 64, {
        "distill": StageRecord(str(stages["distill"]), "distill", [], [], ["11"]),
        "sft": StageRecord(str(stages["sft"]), "sft", [["afterok", "distill"]], [["distill", "result_path"]], ["12"]),
        "grpo": StageRecord(str(stages["grpo"]), "grpo", [["afterok", "sft"]], [["sft", "export"]], ["13"])}))
    return stages


def test_a_pipeline_is_one_row_with_its_stages_and_gpu_hours(tmp_path: Path) -> None:
    pdir = tmp_path / "reason" / "20260101T000000Z-abcdef"
    stages = _record(pdir)
    (stages["distill"] / "tasks" / "0").mkdir(parents=True)
    (stages["distill"] / "tasks" / "0" / "cost.json").write_text(json.dumps({"allocated_gpu_hours": 1.5}))
    rows = [RunRow("reason-distill", "11", str(stages["distill"]), "COMPLETED", array_size=1, nodes=1,
                   gpus_per_node=4, source="sacct",
                   tasks=(TaskRow(0, "11_0", "COMPLETED", "", 1300.0),)),
            RunRow("reason-sft", "12", str(stages["sft"]), "RUNNING", nodes=2, gpus_per_node=8, elapsed_s=900.0,
                   elapsed_at=NOW),
            RunRow("reason-grpo", "13", str(stages["grpo"]), "PENDING", reason="Dependency"),
            RunRow("other", "20", str(tmp_path / "other"), "RUNNING", nodes=1, gpus_per_node=2, elapsed_s=1800.0)]
    out = group_pipelines(rows)
    assert [r.name for r in out] == ["other", "reason"]
    assert out[0].gpu_hours == 1.0  # running: elapsed × GPUs
    pipe = out[1]
    assert (pipe.job_id, pipe.slurm_state, pipe.note) == ("11…", "RUNNING", "running sft")
    assert [(t.label, t.slurm_state, t.reason) for t in pipe.tasks] == [
        ("distill", "COMPLETED", ""), ("sft", "RUNNING", ""), ("grpo", "PENDING", "waits for sft")]
    assert pipe.gpu_hours == 1.5 + 900 * 2 * 8 / 3600  # the ended stage's cost.json + the running one
    console = Console(record=True, width=140, file=io.StringIO(), color_system=None)
    console.print(render_table(out, NOW, 140, expanded={"11…"}))
    text = console.export_text()
    assert "▾ reason" in text and "└ grpo" in text and "waits for sft" in text and "GPU·H" in text
    assert "running sft" in text and "5.5" in text


def test_a_failed_stage_blocks_the_ones_after_it(tmp_path: Path) -> None:
    pdir = tmp_path / "reason" / "20260101T000000Z-abcdef"
    stages = _record(pdir)
    rows = [RunRow("reason-distill", "11", str(stages["distill"]), "COMPLETED"),
            RunRow("reason-sft", "12", str(stages["sft"]), "FAILED"),
            RunRow("reason-grpo", "13", str(stages["grpo"]), "PENDING", reason="DependencyNeverSatisfied")]
    (pipe,) = group_pipelines(rows)
    assert pipe.slurm_state == "PENDING" and pipe.note == "grpo: never runs: sft FAILED"
