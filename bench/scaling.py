"""Scaling on one node: the same model, data, sequence length and per-GPU micro-batch on 1, 2, 4, 8 GPUs.

    python bench/scaling.py --case full8b-zero3 --case lora8b-ddp --gpus 1,2,4,8
    python bench/scaling.py --case lora8b-ddp --gpus 1,2 --cpu-smoke        # gloo, 1 and 2 processes: plumbing

Each point goes through the real runner (`hpcqwen submit --backend local --wait`, via
bench/sft_throughput.py's `run_hpcqwen`), so launcher, data cache, DeepSpeed and callbacks are all in
the figure. Printed per point: tokens/s in total and per GPU, MFU (6·N·T + attention over the 989 TFLOP/s
peak), peak memory per GPU, and scaling efficiency = tok/s on N ÷ (N/M × tok/s on M), M the smallest GPU
count of the case that ran. A point that fails (out of memory on too few GPUs) is shown as failed and the
next count is the reference. GRPO scaling is not here: bench/grpo_gpu.py measures one GPU and its
rollout server needs a second one (issue 19 names what was not run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_throughput as sft  # noqa: E402 - the runner driver and the FLOP count live there

FULL = {"train_type": "full", "learning_rate": 1e-5, "packing": True, "attn_impl": "flash_attn",
        "use_liger_kernel": True, "gradient_checkpointing": True, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1}
CASES: dict[str, tuple[str, list[str], dict[str, object], tuple[int, int]]] = {
    "full8b-zero3": ("8b", [], {**FULL, "deepspeed": "zero3"}, (256, 2048)),
    "full8b-zero2": ("8b", [], {**FULL, "deepspeed": "zero2"}, (256, 2048)),
    "lora8b-ddp": sft.CASES["lora8b"],
}


def efficiency(points: dict[int, float | None]) -> dict[int, float | None]:
    """Scaling efficiency of each GPU count against the smallest count that ran."""
    ran = sorted(n for n, v in points.items() if v)
    if not ran:
        return dict.fromkeys(points)
    m = ran[0]
    base = points[m] or 0.0
    return {n: (v / (n / m * base) if v and base else None) for n, v in points.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts (processes on one node)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=4)
    p.add_argument("--work", default="/tmp/hpcqwen-scaling")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU with gloo, to test the plumbing")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    sft.CASES.update(CASES)  # run_hpcqwen reads its cases from there
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.gpus.split(",")]
    figures: dict[str, list[dict[str, object]]] = {}
    for case in args.case:
        rows: dict[int, dict[str, object]] = {}
        for n in counts:
            run_args = argparse.Namespace(gpus=n, cpu_smoke=args.cpu_smoke, knob=[], warmup=args.warmup,
                                          timed=args.timed, matmul_peak=0.0)
            rows[n] = sft.run_hpcqwen(case, work / f"{case}-{n}", run_args)
        eff = efficiency({n: float(r["tokens_per_s"]) if r.get("ok") else None  # type: ignore[arg-type]
                          for n, r in rows.items()})
        print(f"\n{case} ({'CPU smoke: meaningless figures' if args.cpu_smoke else 'GPUs'})")
        print("| GPUs | tokens/s total | per GPU | MFU (6N) | peak GiB per GPU | scaling efficiency |")
        print("|---|---|---|---|---|---|")
        for n, r in rows.items():
            if not r.get("ok"):
                print(f"| {n} | failed | | | | |")
                continue
            tok = float(r["tokens_per_s"])  # type: ignore[arg-type]
            e = eff[n]
            print(f"| {n} | {tok:,.0f} | {tok / n:,.0f} | {float(r['mfu_6N_vs_989']) / n:.1%} | "  # type: ignore[arg-type]
                  f"{r['peak_alloc_GiB']} | {'' if e is None else f'{e:.0%}'} |")
        figures[case] = [{"gpus": n, **r, "efficiency": eff[n]} for n, r in rows.items()]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
