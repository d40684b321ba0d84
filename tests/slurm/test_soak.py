"""A CI-sized preemption soak (bench/preemption_soak.py has the full one and its table in bench/RESULTS.md).
Seed 3 gives the 2-node SFT a partition preemption, an external `scontrol requeue` and a rank killed mid-save,
and the command job the time-limit USR2, its node set DOWN and `scancel --signal=TERM`. Nothing may be lost
beyond the last save, no step logged twice, and the SFT must end on the loss of an uninterrupted run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_soak(slurm_cluster: str, tmp_path: Path) -> None:
    import preemption_soak as soak

    rows = soak.run_soak(["sft", "command"], 6, seed=3, scale=0.5, root=tmp_path)
    events = {r["workload"]: r["events"] for r in rows}
    assert events == {"soak-sft": "preempt, requeue, kill9", "soak-cmd": "usr2, node_down, term"}
    by_name = {r["workload"]: r for r in rows}
    for r in rows:
        assert r["state"] == "COMPLETED" and r["survived"] == r["n_events"] == 3, r
        assert r["lost_beyond_save"] == 0 and r["duplicates"] == 0 and r["redone_after_signal"] == 0, r
        assert r["final_step"] == r["total"], r
    sft = by_name["soak-sft"]
    assert sft["final_loss"] == sft["reference_loss"], sft  # bit-equal on CPU with a fixed seed
