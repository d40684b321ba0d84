"""The benchmarks' CPU smoke modes, so they cannot rot: each runs end to end on tiny shapes and prints
its comparison line (the figures are meaningless on a CPU; bench/RESULTS.md has the GPU ones)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cpu_train, pytest.mark.slow]
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_sft_throughput_prints_both_ratios(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "sft_throughput.py"), "--case", "lora8b", "--cpu-smoke",
                           "--warmup", "1", "--timed", "2", "--work", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COMPARE lora8b: hpcqwen ")), "")
    assert " vs TRL as in the anchor note " in line and " vs TRL tuned alike " in line, proc.stdout[-3000:]
    assert line.count("x") >= 2 and "not run" not in line


def test_scaling_bench_runs_one_and_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--case", "lora8b-ddp", "--gpus", "1,2",
                           "--cpu-smoke", "--warmup", "1", "--timed", "2", "--work", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["lora8b-ddp"]
    assert [r["gpus"] for r in rows] == [1, 2] and all(r["ok"] for r in rows), rows
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0  # measured against the 1-process run
    assert "| 2 | " in proc.stdout and "scaling efficiency" in proc.stdout
