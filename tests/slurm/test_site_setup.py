"""A site profile's `setup` lines on the real local cluster, through the sbatch and the submitit backend:
lines that read unset variables work, and the first failing line ends the job before anything starts,
naming the line (issue 13 item 11)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK

pytestmark = pytest.mark.slurm


def _submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], backend: str,
            setup: list[str]) -> tuple[Path, str]:
    """Submit a one-step command job on a profile with these setup lines; wait; return (run dir, its logs)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "site11.yaml").write_text("partition: debug\ncpus_per_gpu: 1\nrun_root: ${HPCQWEN_RUN_ROOT}\n"
                                          f"setup: {json.dumps(setup)}\n")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(profiles))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: setup11-{uuid.uuid4().hex[:6]}\ncluster: site11\nresources: {{time_limit_min: 5}}\n"
                    "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1']}\n")
    assert main(["submit", str(spec), "--backend", backend]) == EXIT_OK
    out = capsys.readouterr().out
    run_dir = Path(out.split("run dir: ")[1].split()[0])
    runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=2)
    logs = "".join(p.read_text() for p in sorted(run_dir.rglob("*.out")))
    return run_dir, logs


@pytest.mark.parametrize("backend", ["slurm", "submitit"])
def test_a_failing_setup_line_fails_the_job_naming_the_line(slurm_cluster: str, tmp_path: Path, backend: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, logs = _submit(tmp_path, monkeypatch, capsys, backend, ["export SITE=1", "module_load cuda/99.9"])
    assert "hpcqwen: profile setup line 2 failed (exit 127); nothing was started: module_load cuda/99.9" in logs
    assert not (run_dir / "launches.jsonl").exists() and " launch: " not in logs  # no launcher ever ran
    assert main(["status", str(run_dir)]) == EXIT_OK
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["slurm", "submitit"])
def test_setup_lines_reading_unset_variables_run(slurm_cluster: str, tmp_path: Path, backend: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, logs = _submit(tmp_path, monkeypatch, capsys, backend,
                            ['echo "site sees [${HPCQWEN_SURELY_UNSET_11}]"'])
    assert "site sees []" in logs and "steps: finished 1 steps" in logs, logs[-2000:]
    assert (run_dir / "OUTCOME").read_text().startswith("done")
