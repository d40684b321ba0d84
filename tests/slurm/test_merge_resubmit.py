"""`hpcqwen merge --resubmit` on the real local Slurm cluster: the resubmission is a freshly rendered
script for the unfinished shards' array tasks, with the spec's throttle and without the original
submission's (stale) `--dependency`, submitted through the Slurm backend; a refused resubmission
leaves no script and no manifest entry behind."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_SLURM
from hpcqwen.paths import RunPaths
from hpcqwen.shards import done_file
from hpcqwen.spec import parse_spec, read_source
from hpcqwen.submit import prepare_run_dir

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
STALE = "4000000001"  # the original submission waited for this job; it no longer exists


def _run_dir(tiny_qwen3_dir: Path, *sets: str) -> Path:
    """A distill run dir of 4 shards (array throttle 2) as `submit` writes it, shards 0 and 2 done."""
    name = f"data12-resubmit-{uuid.uuid4().hex[:6]}"
    source = read_source(REPO / "jobspecs/qwen3-tiny-distill.yaml",
                         (f"name={name}", f"task.model={tiny_qwen3_dir}", "task.infer_backend=hf", "task.shards=4",
                          "array.throttle=2", *sets))
    spec = parse_spec(source)
    paths = prepare_run_dir(spec, source, "slurm", {"afterok": [STALE]})
    for shard in (0, 2):
        done_file(paths.root, shard).parent.mkdir(parents=True, exist_ok=True)
        done_file(paths.root, shard).write_text("{}\n")
    return paths.root


def test_resubmit_renders_the_unfinished_tasks_with_the_throttle_and_no_stale_dependency(
        slurm_cluster: str, tiny_qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tiny_qwen3_dir)
    original = RunPaths(run_dir).sbatch.read_text()
    assert f"#SBATCH --dependency=afterok:{STALE}" in original and "#SBATCH --array=0-3%2" in original
    assert main(["merge", str(run_dir), "--resubmit"]) == EXIT_OK
    out = capsys.readouterr().out
    job = out.split(" as job ")[1].split(";")[0]
    try:
        assert out.startswith("resubmitted shards [1, 3]")
        script = (run_dir / "job-resubmit-1.sbatch").read_text()
        assert "#SBATCH --array=1,3%2" in script and "--dependency" not in script
        assert RunPaths(run_dir).sbatch.read_text() == original  # the first submission's script is kept
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
        assert "ArrayTaskThrottle=2" in shown and STALE not in shown
        assert {f"ArrayTaskId={t}" for t in (1, 3)} <= set(shown.split()) or "ArrayTaskId=1,3%2" in shown
        manifest = json.loads(RunPaths(run_dir).manifest.read_text())
        entry = manifest["resubmits"][0]
        assert len(manifest["resubmits"]) == 1 and manifest["job_ids"][-1] == job
        assert {k: entry[k] for k in ("job_id", "array_tasks", "shards", "script", "backend")} == {
            "job_id": job, "array_tasks": "1,3", "shards": [1, 3], "script": "job-resubmit-1.sbatch",
            "backend": "slurm"}
    finally:
        subprocess.run(["scancel", job], capture_output=True, check=False)


def test_a_refused_resubmission_leaves_nothing_behind(slurm_cluster: str, tiny_qwen3_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tiny_qwen3_dir, "resources.partition=nopartition")
    manifest = RunPaths(run_dir).manifest.read_text()
    assert main(["merge", str(run_dir), "--resubmit"]) == EXIT_SLURM
    assert "sbatch" in capsys.readouterr().err
    assert not (run_dir / "job-resubmit-1.sbatch").exists()
    assert RunPaths(run_dir).manifest.read_text() == manifest
