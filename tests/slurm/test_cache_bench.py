"""bench/cache_scale.py in its CI size: a cold and a warm 8-rank, 2-node SFT through `hpcqwen submit` on
the local cluster, and builds with 1 and 2 tokenizing processes; the script's own checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_train]
REPO = Path(__file__).resolve().parents[2]


def test_cache_bench_ci_mode_measures_cold_and_warm_starts_and_build_scaling(slurm_cluster: str,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cache_scale.py"), "--ci", "--json", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    for phase in ("cold", "warm"):
        assert 0 < figures[f"{phase}_start_to_step_s"] <= figures[f"{phase}_submit_to_step_s"] + 1
    assert len(figures["cold_entries"]) == 1 and not figures["warm_rebuilt"]  # the warm job found the entry
    assert set(figures["builds"]) == {"1", "2"} and figures["identical_bytes"]
    table = done.stdout
    assert "| cold / warm |" in table and "| 2 |" in table and "identical bytes across dataset_num_proc: yes" in table
