"""`hpcqwen plot RUN_DIR`: curves from metrics.jsonl into a PNG in the run dir (real matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_USAGE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_dir_with(tmp_path: Path, tasks: dict[str, list[dict[str, float]]]) -> Path:
    run_dir = tmp_path / "grpo" / "20261128T000000Z-abc123"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text("{}\n")
    for sub, recs in tasks.items():
        d = run_dir / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "lo')
    return run_dir


def records(n: int, reward: bool) -> list[dict[str, float]]:
    return [{"step": s, "loss": 2.0 / s, "lr": 1e-5 * s / n, "tokens_per_s": 900.0 + s, "time": 1000.0 + s,
             **({"reward_mean": s / n} if reward else {})} for s in range(1, n + 1)]


def test_plot_writes_a_png_with_a_reward_panel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_dir_with(tmp_path, {".": records(20, reward=True)})
    assert main(["plot", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {png} (loss, lr, tokens_per_s, reward_mean; 1 series)" in out


def test_plot_draws_every_array_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_dir_with(tmp_path, {"tasks/0": records(5, False), "tasks/1": records(8, False)})
    out_png = tmp_path / "elsewhere.png"
    assert main(["plot", str(run_dir), "--output", str(out_png)]) == EXIT_OK
    assert "(loss, lr, tokens_per_s; 2 series)" in capsys.readouterr().out
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_metrics_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_dir_with(tmp_path, {})
    assert main(["plot", str(run_dir)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error[run-dir]: no metrics yet in" in err and "Traceback" not in err
    assert main(["plot", str(tmp_path)]) == EXIT_USAGE
    assert "is not an hpcqwen run dir" in capsys.readouterr().err
