"""Submit-time checks that read files: the signal lead against an earlier run's step and save times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen import preflight
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_USAGE
from hpcqwen.spec import load_spec


def _earlier_run(run_root: Path, name: str, step_s: float, save_s: float) -> Path:
    run = run_root / name / "20260101T000000Z-abcdef"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    lines = [{"step": s, "phase": "train", "loss": 1.0, "time": 1000.0 + s * step_s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "checkpoints" / "checkpoint-4" / "hpcqwen-complete.json").write_text(json.dumps({"save_s": save_s}))
    return run


def test_a_lead_shorter_than_a_measured_step_and_save_is_refused(write_spec, run_root: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    earlier = _earlier_run(run_root, "grpo-big", step_s=95.0, save_s=60.0)
    spec = write_spec("name: grpo-big\nrequeue: {signal_lead_s: 120}\nresources: {time_limit_min: 60}\n"
                      "task: {kind: command, module: hpcqwen.examples.steps}\n")
    errors, _ = preflight.signal_lead_problems(load_spec(spec))
    assert errors == [f"requeue.signal_lead_s (120 s) is shorter than one step (95 s) plus one save (60 s) plus "
                      f"10 s, as measured in {earlier}: the run would be killed before its last save (set "
                      "requeue.signal_lead_s >= 166)"]
    before = sorted(p.name for p in (run_root / "grpo-big").iterdir())
    assert main(["submit", str(spec), "--backend", "local"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error[spec]: ") and "requeue.signal_lead_s: requeue.signal_lead_s (120 s)" in err
    assert sorted(p.name for p in (run_root / "grpo-big").iterdir()) == before  # nothing submitted
    ok = write_spec("name: grpo-big\nrequeue: {signal_lead_s: 170}\nresources: {time_limit_min: 60}\n"
                    "task: {kind: command, module: hpcqwen.examples.steps}\n", "ok.yaml")
    assert preflight.signal_lead_problems(load_spec(ok)) == ([], [])


def test_distill_batches_count_as_steps(write_spec, run_root: Path) -> None:
    run = run_root / "dist" / "20260101T000000Z-abcdef" / "tasks" / "0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 8, "phase": "generate", "batch_s": 200.0}) + "\n")
    spec = write_spec("name: dist\nresources: {time_limit_min: 60}\ntask: {kind: command, module: m}\n")
    errors, _ = preflight.signal_lead_problems(load_spec(spec))
    assert errors and "one step (200 s) plus one save (0 s)" in errors[0]


def test_without_an_earlier_run_a_full_save_estimate_warns(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "model"
    big.mkdir()
    for f in tiny_qwen3_dir.iterdir():
        (big / f.name).symlink_to(f)
    (big / "extra.safetensors").write_bytes(b"\0" * 10)
    with open(big / "big-00001.safetensors", "wb") as f:
        f.truncate(40 * 10**9)  # sparse: 40 GB of weights -> ~160 s for weights and Adam states at 1 GB/s
    spec = write_spec(f"name: fullsft\nrequeue: {{signal_lead_s: 120}}\nresources: {{time_limit_min: 60}}\n"
                      f"task: {{kind: sft, model: {big}, dataset: [{Path(__file__).parents[2]}/jobspecs/data/"
                      "sft-tiny.jsonl], train_type: full}\n")
    errors, warnings = preflight.signal_lead_problems(load_spec(spec))
    assert errors == [] and len(warnings) == 1 and "may not cover one save: about 160 s" in warnings[0]
