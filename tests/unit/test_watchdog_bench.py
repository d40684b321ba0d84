"""The CI-sized run of bench/watchdog_overhead.py (the full run and its table are in bench/RESULTS.md): both
arms of the SFT finish and log tokens/s, and each injected hang is detected within hang_timeout + one poll."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cpu_train]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "watchdog_overhead.py"


def test_watchdog_bench_ci_mode() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--ci"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s_on"][0] > 0 and result["tokens_per_s_off"][0] > 0
    # end to end, the two arms run one after the other while the parallel suite's other workers load the 2 cores
    # (0.42 seen in CI): only a gross slowdown is caught here; the overhead itself is the line below, measured
    # directly, and the side-by-side figure is bench/RESULTS.md's full run
    assert 0.2 < result["on_over_off"] < 5.0
    assert result["watchdog_share_of_step"] < 0.01  # measured directly: well under 1 % of a tiny model's step
    assert len(result["latencies_s"]) == 2
    assert all(0 < x <= result["bound_s"] + 0.5 for x in result["latencies_s"]), result
