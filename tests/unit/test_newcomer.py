"""The newcomer path (issue 13 item 18): the quickstart skips the vLLM venv it never uses and ends with the exact
next commands; the test script shows the slowest tests and a summary per tier; a training log holds what a
user can act on, not known library noise."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpcqwen.cli import main

REPO = Path(__file__).resolve().parents[2]


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_quickstart_skips_the_vllm_venv_and_prints_the_next_commands(tmp_path: Path) -> None:
    """scripts/quickstart.sh as written, with setup.sh and the venv's programs stubbed (the process boundary)."""
    shutil.copy(REPO / "scripts" / "quickstart.sh", tmp_path / "quickstart.sh")
    (tmp_path / "scripts").mkdir()
    shutil.move(tmp_path / "quickstart.sh", tmp_path / "scripts" / "quickstart.sh")
    _stub(tmp_path / "scripts" / "setup.sh", 'echo "setup HPCQWEN_NO_VLLM=${HPCQWEN_NO_VLLM:-unset}"\n')
    _stub(tmp_path / ".venv" / "bin" / "python", 'echo "python $*"\n')
    _stub(tmp_path / ".venv" / "bin" / "hpcqwen", 'echo "submitted job 7  run dir: $RUNS/quickstart/x"\n')
    (tmp_path / "runs" / "quickstart" / "x").mkdir(parents=True)
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "HPCQWEN_RUN_ROOT": str(tmp_path / "runs"),
           "HOME": str(tmp_path)}
    env.pop("HPCQWEN_NO_VLLM", None)
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "quickstart.sh")], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "setup HPCQWEN_NO_VLLM=1" in out.stdout  # the quickstart never builds .venv-vllm
    assert "source .venv/bin/activate" in out.stdout  # how the README's bare `hpcqwen ...` commands work
    for command in ("hpcqwen status", "hpcqwen logs", "hpcqwen plot", "hpcqwen export", "scripts/setup-vllm.sh"):
        assert command in out.stdout, (command, out.stdout)


def test_the_readme_says_the_commands_need_the_venv() -> None:
    text = (REPO / "README.md").read_text()
    using = text[text.index("## Using it"):]
    assert "source .venv/bin/activate" in using[:1500]


def test_the_test_run_ends_with_the_slowest_tests_and_a_summary_per_tier() -> None:
    assert "--durations=25" in (REPO / "scripts" / "test.sh").read_text()
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=3",
                          "tests/unit/test_render.py", "-k", "time_format or template_stays_small"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "slowest 3 durations" in out.stdout
    assert "tests per tier" in out.stdout and "unit: 2 passed" in out.stdout, out.stdout[-1500:]


def test_the_suite_runs_in_xdist_processes_one_file_per_process_with_the_tier_summary() -> None:
    import ast

    conftest = ast.parse((REPO / "tests" / "conftest.py").read_text())
    assign = next(n for n in conftest.body if isinstance(n, ast.Assign) and n.targets[0].id == "EXCLUSIVE_FILES")
    EXCLUSIVE_FILES = ast.literal_eval(assign.value.args[0])  # frozenset({...}): the set literal inside
    assert "-n \"${HPCQWEN_TEST_WORKERS:-3}\"" in (REPO / "scripts" / "test.sh").read_text()
    assert EXCLUSIVE_FILES and all((REPO / "tests" / "slurm" / name).is_file() for name in EXCLUSIVE_FILES)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope",
                          "-v", "tests/unit/test_render.py", "tests/unit/test_local_ids.py"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "scheduling tests via ByFile" in out.stdout and "tests per tier" in out.stdout
    workers: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        if line.startswith("[gw") and " PASSED " in line:
            workers.setdefault(line.split("::")[0].split()[-1], set()).add(line.split("]")[0])
    assert set(workers) == {"tests/unit/test_render.py", "tests/unit/test_local_ids.py"}
    assert all(len(w) == 1 for w in workers.values()), workers  # each file on one worker


@pytest.mark.cpu_train
def test_a_training_log_has_no_known_library_noise(write_spec, tiny_qwen3_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(f"""
        name: quiet
        resources: {{nproc_per_node: 2}}
        task: {{kind: sft, model: {tiny_qwen3_dir}, dataset: [{REPO}/jobspecs/data/sft-tiny.jsonl], max_steps: 2,
                save_steps: 2, logging_steps: 1, max_length: 128, torch_dtype: float32}}
    """)
    assert main(["submit", str(spec), "--backend", "local", "--wait"]) == 0
    run_dir = Path(capsys.readouterr().out.split("run dir: ")[1].split()[0])
    log = (run_dir / "logs" / "quiet-local.out").read_text()
    for noise in ("FutureWarning", "Loading weights", "Saving the dataset", "real_accelerator.py",
                  "find_unused_parameters=True"):
        assert noise not in log, (noise, log)
    assert "sft: lora on 2 processes" in log and "sft: done at step 2 of 2" in log  # what a user reads stays
