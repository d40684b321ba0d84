"""Sweeps: `sweep:` compiled into one array, chunks under MaxArraySize, and the report's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen import arrays, slurm
from hpcqwen.errors import SpecError
from hpcqwen.launch import launch_env
from hpcqwen.paths import RunPaths
from hpcqwen.render import render_sbatch
from hpcqwen.spec import load_spec, read_source
from hpcqwen.sweep_report import sort_rows, table_lines, task_metrics, to_csv

DATA = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"
SFT = f"name: sw\ntask:\n  kind: sft\n  model: /nonexistent/model\n  dataset: [{DATA}]\n  max_steps: 2\n"


def test_a_grid_times_seeds_is_one_array_of_overrides(write_spec) -> None:
    spec = load_spec(write_spec(SFT + "sweep:\n  grid: {learning_rate: [1e-4, 3e-4, 1e-3], lora_rank: [4, 8]}\n"
                                      "  seeds: [1, 2]\narray: {throttle: 4}\n"))
    assert spec.array is not None and spec.array.count == 12 and spec.array.throttle == 4
    assert spec.array.tasks[0] == {"learning_rate": 1e-4, "lora_rank": 4, "seed": 1}
    assert spec.array.tasks[-1] == {"learning_rate": 1e-3, "lora_rank": 8, "seed": 2}
    tasks = [spec.task_for(i) for i in range(12)]
    assert len({(t.learning_rate, t.lora_rank, t.seed) for t in tasks}) == 12  # every combination once
    assert spec.sweep is not None and spec.sweep.knobs() == ["learning_rate", "lora_rank", "seed"]
    frozen = type(spec).model_validate_json(spec.model_dump_json())  # the node reads the same tasks
    assert frozen.array == spec.array and frozen.task_for(7) == spec.task_for(7)


def test_points_follow_the_grid_and_render_as_one_array_line(write_spec, tmp_path: Path) -> None:
    path = write_spec(SFT + "sweep:\n  grid: {lora_rank: [4, 8]}\n  points: [{lora_rank: 32, lora_alpha: 64}]\n")
    spec = load_spec(path)
    assert [t for t in spec.array.tasks] == [{"lora_rank": 4}, {"lora_rank": 8}, {"lora_rank": 32, "lora_alpha": 64}]
    script = render_sbatch(spec, RunPaths(tmp_path / "run"), read_source(path))
    assert script.count("#SBATCH --array=") == 1 and "#SBATCH --array=0-2\n" in script


def test_a_bad_sweep_value_is_named_where_it_is_written(write_spec) -> None:
    path = write_spec(SFT + "sweep:\n  grid:\n    learning_rate: [1e-4, -1.0]\n    lora_rnak: [4]\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    first, second = (i.render().replace(str(path), "f") for i in info.value.issues)
    assert first == "f:9: sweep.grid.learning_rate[1]: task.learning_rate: must be > 0.0 (got -1.0; expected > 0.0)"
    assert second.startswith("f:10: sweep.grid.lora_rnak[0]: task.lora_rnak: unknown key — did you mean 'lora_rank'? "
                             "valid keys: attn_impl, chat_template, dataloader_num_workers,")


def test_a_sweep_too_large_is_refused_before_it_is_built(write_spec) -> None:
    values = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    path = write_spec(SFT + f"sweep:\n  grid: {{lora_rank: {values}, lora_alpha: {values}, max_steps: {values}}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert issue.message == "makes 1000000000 tasks" and issue.expected == "<= 4000001"


def test_chunks_and_task_groups_stay_under_the_limit() -> None:
    assert arrays.chunks(12, 5) == [(0, 5), (5, 5), (10, 2)]
    assert arrays.chunks(3, 1001) == [(0, 3)]
    assert arrays.group_tasks([11, 1, 6, 5, 1], 5) == [(0, [1]), (5, [0, 1]), (10, [1])]
    rows = [slurm.JobRow("9_1", "9", 1, "RUNNING", "", "x"), slurm.JobRow("8_1", "8", 1, "PENDING", "", "x")]
    assert [r.array_task_id for r in arrays.with_offsets(rows, {"9": 5})] == [6, 1]


def test_a_chunk_script_and_the_launcher_add_the_offset(write_spec, tmp_path: Path) -> None:
    path = write_spec(SFT + "sweep:\n  grid: {lora_rank: [1, 2, 3, 4, 5, 6, 7]}\narray: {throttle: 2}\n")
    spec = load_spec(path)
    paths = RunPaths(tmp_path / "run")
    script = render_sbatch(spec, paths.chunk(2), read_source(path), {"afterany": ["41"]}, array_offset=6,
                           array_count=1)
    assert "#SBATCH --array=0%2\n" in script and "#SBATCH --dependency=afterany:41\n" in script
    assert "export HPCQWEN_ARRAY_OFFSET=6\n" in script
    assert f'TASK_DIR={tmp_path}/run/tasks/"$((SLURM_ARRAY_TASK_ID + 6))"' in script
    assert paths.chunk(2).sbatch.name == "job-chunk-2.sbatch"
    env = {"SLURM_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "0", "HPCQWEN_ARRAY_OFFSET": "6"}
    le = launch_env(env, spec, str(paths.root))
    assert le.array_index == 6 and le.env["HPCQWEN_TASK_DIR"] == str(paths.root / "tasks" / "6")
    assert spec.task_for(le.array_index).lora_rank == 7


def _metrics(task: Path, lines: list[dict[str, object]]) -> None:
    task.mkdir(parents=True)
    (task / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_numbers_come_from_each_tasks_metrics(tmp_path: Path) -> None:
    _metrics(tmp_path / "0", [{"step": 0, "phase": "train", "tokens_seen": 0, "train_time_s": 1.0},
                              {"step": 2, "phase": "train", "loss": 2.5, "tokens_seen": 400, "train_time_s": 3.0},
                              {"step": 2, "phase": "eval", "eval_loss": 2.9, "tokens_seen": 400},
                              {"step": 4, "phase": "train", "loss": 2.1, "tokens_seen": 800, "train_time_s": 5.0},
                              {"step": 4, "phase": "eval", "eval_loss": 3.0},
                              {"step": 4, "phase": "done"}])
    assert task_metrics(tmp_path / "0") == {"loss": 2.1, "best_loss": 2.1, "eval_loss": 3.0, "best_eval_loss": 2.9,
                                            "reward": None, "best_reward": None, "tokens_per_s": 160.0}
    rows = [{"task": 0, "lr": 1e-4, "state": "COMPLETED", "loss": 2.1, "gpu_hours": 0.5},
            {"task": 1, "lr": 1e-3, "state": "FAILED", "loss": None, "gpu_hours": 0.1},
            {"task": 2, "lr": 3e-4, "state": "COMPLETED", "loss": 1.7, "gpu_hours": 0.4}]
    assert [r["task"] for r in sort_rows(rows, "loss")] == [2, 0, 1]  # lowest first, missing last
    assert to_csv(["lr"], rows).splitlines()[0] == ("task,lr,state,loss,best_loss,eval_loss,best_eval_loss,"
                                                    "reward,best_reward,tokens_per_s,gpu_hours")
    assert to_csv(["lr"], rows).splitlines()[2] == "1,0.001,FAILED,,,,,,,,0.1"
    assert table_lines(["lr"], rows)[0].split() == ["task", "lr", "state", "loss", "best_loss", "eval_loss",
                                                    "best_eval_loss", "reward", "best_reward", "tokens_per_s",
                                                    "gpu_hours"]


def test_a_point_cannot_change_the_task_kind(write_spec) -> None:
    path = write_spec(SFT + "sweep:\n  points: [{kind: grpo}]\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert (issue.key, issue.message, issue.got) == ("sweep.points[0]", "is not a task knob name", "'kind'")
