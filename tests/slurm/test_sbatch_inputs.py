"""What reaches sbatch, on the real local Slurm cluster: a run root with every character hpcqwen allows in
`#SBATCH` lines is read literally by sbatch (log and working directory land where they should); a run
dir whose manifest was tampered with is refused before sbatch runs, so nothing is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen import slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK

pytestmark = pytest.mark.slurm


def test_allowed_run_root_characters_reach_sbatch_literally(slurm_cluster: str, write_spec, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "r+1,2:3@4=5-6_7.8ü"
    spec = write_spec(f"name: spec12-chars\ncluster: {{profile: local, run_root: '{root}'}}\n"
                      "resources: {time_limit_min: 5}\ntask: {kind: command, module: hpcqwen.examples.steps, "
                      "args: [--steps, '1']}\n")
    assert main(["submit", str(spec), "--wait"]) == EXIT_OK, capsys.readouterr().err
    out = capsys.readouterr().out
    job, run_dir = out.splitlines()[0].removeprefix("submitted job ").split("  run dir: ")
    assert Path(run_dir).parent == root / "spec12-chars"
    logs = list((Path(run_dir) / "logs").glob(f"spec12-chars-{job}.out"))
    assert logs, f"sbatch did not write the log under {run_dir}/logs (--output was misread)"
    rows = slurm.query_jobs([job])[job]
    assert rows and rows[0].work_dir == run_dir  # --chdir read as written


def test_tampered_run_dir_dependency_never_reaches_sbatch(slurm_cluster: str, write_spec, tmp_path: Path,
                                                         run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "old" / "20260101T000000Z-abcdef"
    run.mkdir(parents=True)
    (run / "spec.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps({"job_ids": ["1\n#SBATCH --wrap=touch " + str(tmp_path / "X")]}))
    spec = write_spec(f"name: spec12-tamper\ndepends_on: ['{run}']\ntask: {{kind: command, module: m}}\n")
    assert main(["submit", str(spec), "--backend", "slurm"]) == 1
    err = capsys.readouterr().err
    assert "holds no valid Slurm job id" in err and f"{spec}: depends_on[0]" in err
    assert not list(run_root.iterdir()) and not (tmp_path / "X").exists()
    assert not [r for r in slurm.squeue() if r.name == "spec12-tamper"]
