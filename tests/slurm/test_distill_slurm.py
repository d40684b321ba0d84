"""Distillation on the real local Slurm cluster: 3 shards as one array through `hpcqwen submit`; one task
is cancelled mid-shard (its runner dies on SIGTERM, and a torn line is added as if it died mid-write);
`hpcqwen merge --resubmit` reruns only that array task, which skips every id already written; the
merged file then has exactly one SFT row per prompt × answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import wait_until

from hpcqwen import slurm
from hpcqwen.cli import main
from hpcqwen.data.formats import load_dataset_rows
from hpcqwen.errors import EXIT_OK, EXIT_USAGE

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
PROMPTS, SHARDS, ANSWERS = 36, 3, 2


def task_states(job: str) -> dict[int | None, str]:
    return {r.array_task_id: r.slurm_state for r in slurm.query_jobs([job])[job]}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def test_killed_shard_resubmits_without_duplicating_or_losing_an_id(slurm_cluster: str, tiny_qwen3_dir: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sets = [f"task.model={tiny_qwen3_dir}", "task.infer_backend=hf", f"task.shards={SHARDS}",
            f"task.dataset=[{REPO}/jobspecs/data/sft-tiny.jsonl#{PROMPTS}]", f"task.num_return_sequences={ANSWERS}",
            "task.write_batch_size=1", "task.max_new_tokens=64"]
    assert main(["submit", str(REPO / "jobspecs/qwen3-tiny-distill.yaml"), *[f"--set={s}" for s in sets]]) == EXIT_OK
    out = capsys.readouterr().out
    job, run_dir_text = out.splitlines()[0].removeprefix("submitted job ").split("  run dir: ")
    run_dir = Path(run_dir_text)
    shard1 = run_dir / "shards/shard-1.jsonl"

    # Cancel array task 1 once it has written 2 prompts (of 12): mid-shard.
    wait_until(lambda: len(lines(shard1)) >= 2, 180, "shard 1 to have 2 prompts written")
    slurm.scancel([f"{job}_1"])
    wait_until(lambda: len(task_states(job)) == SHARDS and set(task_states(job).values()) <= {"COMPLETED", "CANCELLED"},
               180, "every array task to end", every=1)
    assert task_states(job) == {0: "COMPLETED", 1: "CANCELLED", 2: "COMPLETED"}
    before = lines(shard1)
    assert 2 <= len(before) < PROMPTS // SHARDS
    assert not (run_dir / "shards/shard-1.done").exists() and not (run_dir / "distill_dataset.jsonl").exists()
    first_log = "".join(p.read_text() for p in (run_dir / "logs").glob(f"*-{job}_*.out"))
    assert "distill: shards [2] complete; the merge waits for shards [1]" in first_log \
        or "distill: shards [0] complete; the merge waits for shards [1]" in first_log
    torn = '{"id": 99, "messages": [{"ro'
    with open(shard1, "a") as f:
        f.write(torn)  # as if the runner had died inside a write

    # The merge refuses, naming the shard; --resubmit reruns exactly array task 1.
    assert main(["merge", str(run_dir)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error[distill]: 1 of 3 shards are not complete (shard 1: {len(before)} written)" in err
    assert f"hint: resubmit them: hpcqwen merge {run_dir} --resubmit" in err
    assert main(["merge", str(run_dir), "--resubmit"]) == EXIT_OK
    out = capsys.readouterr().out
    job2 = out.split(" as job ")[1].split(";")[0]
    assert out.startswith(f"resubmitted shards [1] (prompts already written: {{1: {len(before)}}}) as job {job2}")
    wait_until(lambda: task_states(job2) == {1: "COMPLETED"}, 240, "the resubmitted task to complete", every=1)

    log = next((run_dir / "logs").glob(f"*-{job2}_1.out")).read_text()
    assert f"distill: shard 1: cut a torn last line ({len(torn)} bytes)" in log
    assert f"this task: shards [1] ({PROMPTS // SHARDS} prompts, {len(before)} written)" in log
    assert f"distill: engine 0: {PROMPTS // SHARDS - len(before)} prompts to generate" in log
    assert f"distill: merged {PROMPTS * ANSWERS} rows ({PROMPTS} prompts × {ANSWERS}" in log
    after = lines(shard1)
    assert after[:len(before)] == before  # written answers survive byte for byte, none regenerated
    for s in range(SHARDS):
        ids = [json.loads(x)["id"] for x in lines(run_dir / f"shards/shard-{s}.jsonl")]
        assert len(ids) == len(set(ids)) == PROMPTS // SHARDS, (s, ids)
    merged = run_dir / "distill_dataset.jsonl"
    rows = load_dataset_rows([str(merged)], base_dir="/", seed=0)  # a valid SFT dataset
    assert sorted((r["id"], r["sample"]) for r in rows) == [(i, j) for i in range(PROMPTS) for j in range(ANSWERS)]
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].startswith(
        "<think>\n\n</think>\n\n") for r in rows)
    first = merged.read_bytes()
    assert main(["merge", str(run_dir)]) == EXIT_OK  # idempotent: the same bytes again
    assert f"merged {PROMPTS * ANSWERS} rows" in capsys.readouterr().out and merged.read_bytes() == first
    manifest = json.loads((run_dir / "manifest.json").read_text())
    [again] = manifest["resubmits"]
    assert again == {**again, "job_id": job2, "job_ids": [job2], "array_tasks": "1", "shards": [1],
                     "script": "job-resubmit-1.sbatch", "backend": "slurm"}
    metrics = [json.loads(x) for x in (run_dir / "tasks/1/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == {**metrics[-1], "phase": "done", "done": 12, "total": 12, "shards_done": 1}
    print(f"\nshard-resume evidence: job {job} task 1 cancelled after {len(before)} of {PROMPTS // SHARDS} prompts; "
          f"resubmitted as {job2}: generated {PROMPTS // SHARDS - len(before)}, merged {len(rows)} rows, "
          f"0 duplicates")
    subprocess.run(["scancel", job, job2], capture_output=True, check=False)
