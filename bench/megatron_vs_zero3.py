"""Megatron (expert parallel) vs DeepSpeed ZeRO-3 on the same MoE model, data and GPUs, in one call.

    python bench/megatron_vs_zero3.py --case moe30b-12l --gpus 4        # the issue's comparison (target >= 5x)
    python bench/megatron_vs_zero3.py --case moe30b-4l --gpus 1         # the same comparison on one GPU (EP 1)
    python bench/megatron_vs_zero3.py --case experts-538m --gpus 1 --long 300   # grouped_mm vs SequentialMLP
    python bench/megatron_vs_zero3.py --case moe30b-12l --gpus 4 --only zero3   # one side per device call
    python bench/megatron_vs_zero3.py --case moe30b-12l --gpus 4 --dry-run   # write + validate the specs only

`moe30b-12l`: the Qwen3-30B-A3B layer shape (hidden 2048, 32 heads / 4 KV, 128 experts top-8, expert
FFN 768, vocab 151936) with 12 of its 48 layers (7.6 B parameters, ~0.8 B active), random bf16 weights,
so that ZeRO-3's 16 bytes per parameter fit 4 × 80 GB. Both runs go through `hpcqwen submit --backend
local --wait` (the real launcher and runners) on the same packed data (rows of `--max-length` tokens,
random-text conversations written with the real Qwen3 tokenizer) and the same global batch of rows:
- megatron: `task.kind: megatron`, TP 1, EP = DP = the GPUs, grouped experts (TE's, else
  `F.grouped_mm`), flash attention, full recompute, `no_save_optim`;
- zero3: `task.kind: sft`, `train_type: full`, `deepspeed: zero3`, `attn_impl: flash_attn`, gradient
  checkpointing, 1 row per GPU per micro-batch and gradient accumulation up to the same global batch.
Reported: median s/it over the timed iterations (metrics.jsonl times), tokens/s, peak GiB, and
zero3 s/it ÷ megatron s/it (the guide: 91.2 / 9.6 = 9.5× on 16 GPUs with the full 30B model).
`moe30b-4l` is the same layer shape with 4 layers (3.1 B parameters, 18 bytes each for either
optimizer fit one 141 GB card): on one GPU there is no expert parallelism and ZeRO-3 gathers nothing
from other ranks, so it compares the kernels and schedules alone, not the communication that the
guide's multi-node ratio is mostly about.

`experts-538m`: the 538M Qwen3-MoE-like model of ../shared/notes/mcore-gpu.md (hidden 1024, 8 layers,
16 experts top-4, expert FFN 512, untied vocab 151936) on one GPU, rows of ~2048 tokens, micro-batch 4
× 2 micro-batches (16k tokens per iteration): `moe_grouped_gemm` true (TorchGroupedMLP) vs false
(megatron's SequentialMLP), both with SDPA attention, and the note's own configuration (SequentialMLP +
DotProductAttention, which measured 27.5k tokens/s on an H200): tokens/s and the ratios (target >= 2×).
`--long N` adds a side `grouped-long`: the grouped configuration for N iterations over the same few
rows (many epochs), to show the loss of a ~0.5 B model falling over hundreds of iterations.

Each side's figures are kept in <work>/results-<case>.json, so the two sides may run in separate
calls on the same warm machine (`--only`; a device command may run 10 minutes at most); the COMPARE
line is printed once both are there. Record the printed COMPARE lines in bench/RESULTS.md with the card.
Needs megatron-core on the GPU machine, and hpcqwen's other dependencies that its image lacks: carry
`.whl` with megatron-core 0.16.1 (cp312), pydantic, submitit, datasets, trl, deepspeed and the rest
listed in bench/RESULTS.md, installed with `pip install --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MOE_30B_12L = dict(hidden_size=2048, num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=4,
                   head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                   num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False)
MOE_538M = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                intermediate_size=3072, moe_intermediate_size=512, num_experts=16, num_experts_per_tok=4,
                norm_topk_prob=True, tie_word_embeddings=False)
CASES: dict[str, dict[str, Any]] = {
    "moe30b-12l": {"shape": MOE_30B_12L, "max_length": 4096, "rows_per_gpu": 2},
    "moe30b-4l": {"shape": dict(MOE_30B_12L, num_hidden_layers=4), "max_length": 4096, "rows_per_gpu": 4},
    "experts-538m": {"shape": MOE_538M, "max_length": 2048, "rows_per_gpu": 8},
}


def build_model(out: Path, shape: dict[str, Any], cpu: bool) -> Path:
    """A random-init Qwen3-MoE of `shape` in bf16 (built on the GPU) with the full Qwen3 tokenizer."""
    from hpcqwen.testing import build_tiny_qwen3, build_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer(out.with_name(out.name + "-tok"), truncated=cpu)
    fields = dict(shape, vocab_size=4288 if cpu else 151936, max_position_embeddings=40960)
    if cpu:
        fields.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    t0 = time.time()
    build_tiny_qwen3(out, tok, moe=True, dtype="float32" if cpu else "bfloat16", device="cpu" if cpu else "cuda",
                     **fields)
    print(f"model {out} written in {time.time() - t0:.0f} s", flush=True)
    return out


def megatron_task(model: Path, data: Path, args: argparse.Namespace, grouped: bool = True) -> dict[str, Any]:
    """The megatron run: EP over all GPUs, packed rows."""
    case = CASES[args.case]
    return {"kind": "megatron", "load": str(model), "dataset": [str(data)], "expert_model_parallel_size": args.gpus,
            "moe_grouped_gemm": grouped, "moe_aux_loss_coeff": 0.01, "micro_batch_size": 1,
            "global_batch_size": case["rows_per_gpu"] * args.gpus, "packing": True, "use_flash_attn": True,
            "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1,
            "train_iters": args.warmup + args.timed, "lr": 1e-5, "max_length": case["max_length"],
            "save_interval": 100000, "log_interval": 1, "no_save_optim": True, "no_save_rng": True}


def experts_task(model: Path, data: Path, args: argparse.Namespace, grouped: bool, flash: bool = True,
                 iters: int | None = None) -> dict[str, Any]:
    """The note's probe setup: fixed 2048-token rows, micro-batch 4 × 2 micro-batches, no recompute."""
    return {"kind": "megatron", "load": str(model), "dataset": [str(data)], "moe_grouped_gemm": grouped,
            "moe_aux_loss_coeff": 1e-3, "micro_batch_size": 4, "global_batch_size": 8 * args.gpus,
            "packing": False, "use_flash_attn": flash, "train_iters": iters or args.warmup + args.timed, "lr": 1e-4,
            "max_length": 2048, "save_interval": 100000, "log_interval": 1, "no_save_optim": True,
            "no_save_rng": True}


def zero3_task(model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The SFT runner with ZeRO-3 on the same rows and global batch."""
    case = CASES[args.case]
    return {"kind": "sft", "model": str(model), "dataset": [str(data)], "train_type": "full",
            "torch_dtype": "bfloat16", "deepspeed": "zero3", "packing": True, "attn_impl": "flash_attn",
            "gradient_checkpointing": True, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": case["rows_per_gpu"], "max_length": case["max_length"],
            "max_steps": args.warmup + args.timed, "learning_rate": 1e-5, "logging_steps": 1, "save_steps": 100000,
            "warmup_ratio": 0.0, "use_liger_kernel": False}


def spec_for(name: str, task: dict[str, Any], work: Path, args: argparse.Namespace) -> Path:
    """A local-backend spec file (JSON is YAML)."""
    spec = {"name": name, "cluster": {"profile": "local", "run_root": str(work / "runs"),
                                      "cache_root": str(work / "cache")},
            "resources": {"nodes": 1, "gpus_per_node": args.gpus, "time_limit_min": 120},
            "requeue": {"enabled": False}, "task": task}
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def run(name: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`hpcqwen submit --backend local --wait`; s/it, tokens/s and peak memory from metrics.jsonl."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "local", "--wait"],
                          capture_output=True, text=True, env=env)
    run_dir = Path(proc.stdout.split("run dir: ")[1].split()[0]) if "run dir: " in proc.stdout else None
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out")) if run_dir else proc.stderr
    if proc.returncode != 0 or run_dir is None:
        print(log[-6000:], flush=True)
        return {"name": name, "ok": False, "error": (proc.stderr or log)[-800:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train" and "loss" in r]
    timed = train[args.warmup:]
    gaps = [b["time"] - a["time"] for a, b in zip(train[args.warmup - 1:-1], timed, strict=True)] if args.warmup else []
    out = {"name": name, "ok": True, "s_per_it": round(statistics.median(gaps), 3) if gaps else None,
           "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed if r.get("tokens_per_s")), 1)
           if any(r.get("tokens_per_s") for r in timed) else None,
           "peak_GiB": max((r.get("peak_mem_gb") or 0) for r in rows), "losses": [round(r["loss"], 3) for r in train],
           "wall_s": round(time.time() - t0, 1), "run_dir": str(run_dir)}
    print("RESULT", json.dumps(out), flush=True)
    return out


def main() -> None:
    """Build the model and data, run both sides, print one COMPARE line."""
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=sorted(CASES), default="moe30b-12l")
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=5)
    p.add_argument("--work", default="/tmp/hpcqwen-bench-megatron")
    p.add_argument("--long", type=int, default=0, help="experts-538m: also train the grouped model this many "
                   "iterations (side grouped-long) and report its loss curve")
    p.add_argument("--only", action="append", default=[], help="run only these sides (megatron, zero3, grouped, "
                   "sequential, note-baseline, grouped-long); the others' earlier results are read from the work dir")
    p.add_argument("--dry-run", action="store_true", help="build a tiny model on CPU, write and validate the specs")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from sft_throughput import write_data

    case = CASES[args.case]
    model = build_model(work / f"model-{args.case}{'-cpu' if args.dry_run else ''}", case["shape"], args.dry_run)
    rows = case["rows_per_gpu"] * args.gpus * (args.warmup + args.timed)
    data = work / f"data-{args.case}.jsonl"
    # experts-538m: rows of nearly max_length tokens, as the note's fixed 2048-token rows
    lens = (case["max_length"] - 160, case["max_length"] - 64) if args.case == "experts-538m" else (256, 2048)
    n_docs = int(rows * (1.0 if args.case == "experts-538m" else 4.0)) + 16
    write_data(data, model, n_docs, lens)
    if args.case == "experts-538m":
        pairs = [("grouped", experts_task(model, data, args, True)),
                 ("sequential", experts_task(model, data, args, False)),
                 # the note's exact configuration: SequentialMLP + megatron's DotProductAttention
                 ("note-baseline", experts_task(model, data, args, False, flash=False))]
        if args.long:
            pairs.append(("grouped-long", experts_task(model, data, args, True, iters=args.long)))
    else:
        pairs = [("megatron", megatron_task(model, data, args)), ("zero3", zero3_task(model, data, args))]
    specs = [(name, spec_for(f"bench-{args.case}-{name}", task, work, args)) for name, task in pairs]
    if args.dry_run:
        from hpcqwen.spec import load_spec

        for name, spec in specs:
            s = load_spec(spec)
            print(f"DRY-RUN {name}: {s.task.kind} spec valid, world size {s.world_size}: {spec}", flush=True)
        return
    saved = work / f"results-{args.case}.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name, spec in specs:
        if not args.only or name in args.only:
            results[name] = run(name, spec, args)
            saved.write_text(json.dumps(results, indent=1))
    long = results.get("grouped-long") if args.long else None
    if long and long.get("ok"):
        losses = long["losses"]
        print(f"LONG {args.case}: grouped, {len(losses)} iterations over {n_docs} distinct rows: loss {losses[0]} -> "
              f"{losses[-1]} (mean of the first 10 {statistics.mean(losses[:10]):.3f}, of the last 10 "
              f"{statistics.mean(losses[-10:]):.3f}); {long['tokens_per_s']} tok/s, peak {long['peak_GiB']} GiB",
              flush=True)
    if any(name not in results for name, _ in specs):
        print(f"COMPARE {args.case}: waiting for {[n for n, _ in specs if n not in results]} (--only)", flush=True)
        return
    (a, ra), (b, rb) = [(name, results[name]) for name, _ in specs[:2]]
    if ra.get("ok") and rb.get("ok") and ra.get("s_per_it") and rb.get("s_per_it"):
        if args.case == "experts-538m":
            ratio = float(ra["tokens_per_s"]) / float(rb["tokens_per_s"])
            base = results["note-baseline"]
            vs_note = float(ra["tokens_per_s"]) / float(base["tokens_per_s"]) if base.get("tokens_per_s") else 0.0
            print(f"COMPARE {args.case} on {args.gpus} GPU(s): grouped {ra['tokens_per_s']} tok/s vs sequential "
                  f"{rb['tokens_per_s']} tok/s: {ratio:.2f}x; vs the note's configuration (SequentialMLP + "
                  f"DotProductAttention) {base.get('tokens_per_s')} tok/s: {vs_note:.2f}x (target >= 2x; the note "
                  "measured 27,541 tok/s on an H200 with megatron-core 0.19.2)", flush=True)
        else:
            ratio = float(rb["s_per_it"]) / float(ra["s_per_it"])
            print(f"COMPARE {args.case} on {args.gpus} GPU(s): megatron {ra['s_per_it']} s/it "
                  f"({ra['tokens_per_s']} tok/s, "
                  f"peak {ra['peak_GiB']} GiB) vs ZeRO-3 {rb['s_per_it']} s/it ({rb['tokens_per_s']} tok/s, peak "
                  f"{rb['peak_GiB']} GiB): {ratio:.2f}x (target >= 5x; the guide 9.5x)", flush=True)
    else:
        print(f"COMPARE {args.case}: {a} {ra} {b} {rb}", flush=True)


if __name__ == "__main__":
    main()
