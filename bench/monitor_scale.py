"""Frame time of `hpcqwen queue` over 10,000 synthetic runs, against laying out every row.

    .venv/bin/python bench/monitor_scale.py [--rows 10000] [--repeat 9] [--width 160] [--height 50]

A frame is what the live view draws each second: sort and count all rows, lay out the lines
that fit the terminal, and write them (with colours) to a terminal-like console. The target is
under 100 ms for 10,000 rows. The baseline lays out all rows in one rich Table, as a monitor
without a viewport would (what `--once` does, since it prints everything). Prints medians and
the ratio; no cluster needed.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time

from rich.console import Console

from hpcqwen.monitor import Progress, RunRow, TaskRow
from hpcqwen.monitor_view import render_table
from hpcqwen.polling import PollStatus

STATES = ["RUNNING"] * 5 + ["PENDING"] * 3 + ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"]
REASONS = ["Resources", "Priority", "Dependency", "JobHeldUser", "DependencyNeverSatisfied", "QOSMaxGRESPerUser"]


def synthetic_rows(n: int, now: float, seed: int = 0) -> list[RunRow]:
    """`n` runs: mostly running and pending, one in 20 an 8-task array, metrics on running ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        state = rng.choice(STATES)
        running = state == "RUNNING"
        total = rng.choice([500, 2000, 10000])
        step = rng.randrange(1, total) if state != "PENDING" else None
        prog = Progress(step=step, total_steps=total, loss=rng.uniform(0.2, 3.0),
                        losses=tuple(rng.uniform(0.2, 3.0) for _ in range(24)), lr=1e-5,
                        tokens_per_s=rng.uniform(500, 90000), steps_per_s=rng.uniform(0.01, 2.0),
                        reward_mean=rng.uniform(0, 1) if i % 7 == 0 else None,
                        updated_at=now - rng.uniform(0, 900)) if step else None
        tasks = tuple(TaskRow(t, f"{100000 + i}_{t}", rng.choice(STATES), "JobArrayTaskLimit", 600.0, prog)
                      for t in range(8)) if i % 20 == 0 else ()
        rows.append(RunRow(
            name=f"qwen3-{rng.choice(['0.6b', '8b', '32b'])}-{rng.choice(['sft', 'grpo', 'distill'])}-{i}",
            job_id=str(100000 + i), run_dir=f"/runs/x/{i}", slurm_state=state,
            reason=rng.choice(REASONS) if state == "PENDING" else "", dependency="afterok:99(unfulfilled)",
            user="alice", nodes=rng.choice([1, 2, 4, 16]), gpus_per_node=8, elapsed_s=rng.uniform(0, 86400),
            elapsed_at=now - 10 if running else None, time_limit_s=86400.0, restarts=rng.choice([0, 0, 0, 1, 3]),
            progress=prog, checkpoint_step=(step // 100) * 100 if step else None,
            checkpoint_at=now - rng.uniform(0, 3600) if step else None, tasks=tasks,
            array_size=8 if tasks else None, submitted_at=now - rng.uniform(0, 86400)))
    return rows


def frame_ms(rows: list[RunRow], now: float, width: int, height: int | None) -> float:
    """Milliseconds to build one frame and write it to a colour terminal console."""
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    status = PollStatus(fetched_at=now - 5, attempted_at=now - 5, next_at=now + 25)
    t0 = time.perf_counter()
    console.print(render_table(rows, now, width, status=status, interval_s=30, selected=1234, expanded={"100000"},
                               height=height))
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    """Time the viewport frame and the all-rows baseline."""
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=50, help="terminal lines (the table gets height - 8)")
    args = p.parse_args()
    now = time.time()
    rows = synthetic_rows(args.rows, now)
    frame_ms(rows, now, args.width, args.height - 8)  # warm-up (imports, rich's caches)
    ours = [frame_ms(rows, now, args.width, args.height - 8) for _ in range(args.repeat)]
    base = [frame_ms(rows, now, args.width, None) for _ in range(max(1, args.repeat // 3))]
    a, b = statistics.median(ours), statistics.median(base)
    verdict = "PASS" if a < 100 else "FAIL"
    print(f"{args.rows} runs, {args.width}x{args.height} terminal, median of {args.repeat}: "
          f"frame {a:.1f} ms (min {min(ours):.1f}, max {max(ours):.1f}) [{verdict}: target < 100 ms]; "
          f"baseline laying out all rows {b:.0f} ms (median of {len(base)}); ratio {b / a:.0f}x")


if __name__ == "__main__":
    main()
