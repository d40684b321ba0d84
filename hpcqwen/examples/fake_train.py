"""Synthetic training progress for monitor tests: metrics.jsonl lines and checkpoints, no model.

Writes one `metrics.jsonl` record per step into HPCQWEN_TASK_DIR with the keys documented in
`hpcqwen.metrics` (step, total_steps, loss, lr, grad_norm, tokens_per_s, phase, time), plus
GRPO's `reward_mean`/`reward_std` with `--grpo` and distill's `done`/`total`/`shards_done` with
`--distill`. Every `--save-every` steps it writes a complete checkpoint (marker last), and a
restart resumes from the newest complete one, as a real runner does. The numbers are a fixed
function of the step, so a test knows what the monitor must show.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from hpcqwen import stopping
from hpcqwen.checkpoints import checkpoint_dir, latest_complete, mark_complete, step_of
from hpcqwen.metrics import MetricsWriter
from hpcqwen.paths import TaskPaths


def record(step: int, total: int, grpo: bool, distill: bool) -> dict[str, object]:
    """The metrics line of one step."""
    rec: dict[str, object] = {
        "step": step, "total_steps": total, "epoch": round(step / total, 4),
        "loss": round(0.4 + 2.0 * math.exp(-3.0 * step / total) + 0.02 * math.sin(step), 4),
        "lr": round(2e-5 * min(1.0, step / 5) * (1 - step / (total + 1)), 9),
        "grad_norm": round(1.0 + 0.5 * math.cos(step), 4), "tokens_per_s": 1000.0 + 10 * (step % 7),
        "peak_mem_gb": 1.5, "phase": "train",
    }
    if grpo:
        rec.update({"reward_mean": round(0.1 + 0.8 * step / total, 4), "reward_std": 0.2, "kl": 0.01})
    if distill:
        rec.update({"done": step * 8, "total": total * 8, "shards_done": step // 4})
    return rec


def save(task: TaskPaths, step: int) -> None:
    """A complete checkpoint of `step` (marker last)."""
    ckpt = checkpoint_dir(task.checkpoints, step)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "state.txt").write_text(f"{step}\n")
    mark_complete(ckpt)


def main() -> None:
    """Run (or resume) the fake loop."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--grpo", action="store_true", help="add GRPO reward keys")
    p.add_argument("--distill", action="store_true", help="add distill shard progress keys")
    args = p.parse_args()
    task = TaskPaths(Path(os.environ["HPCQWEN_TASK_DIR"]))
    stopping.install_handlers(task.stop)
    writer = MetricsWriter(task.metrics)
    last = latest_complete(task.checkpoints)
    step = (step_of(last) or 0) if last else 0
    print(f"fake_train: start at step {step} of {args.steps}", flush=True)
    while step < args.steps:
        if stopping.requested():
            save(task, step)
            writer.write({"step": step, "total_steps": args.steps, "phase": "stopped"})
            print(f"fake_train: stop requested, saved and stopped at step {step}", flush=True)
            sys.exit(stopping.EXIT_STOPPED)
        time.sleep(args.step_seconds)
        step += 1
        writer.write(record(step, args.steps, args.grpo, args.distill))
        stopping.mark_progress(task.progress)
        print(f"fake_train: step {step}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save(task, step)
    writer.write({"step": step, "total_steps": args.steps, "phase": "done"})
    print(f"fake_train: finished {step} steps", flush=True)


if __name__ == "__main__":
    main()
