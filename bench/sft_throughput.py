"""SFT throughput: hpcqwen's runner vs the plain TRL baseline, side by side in one call.

    python bench/sft_throughput.py --case lora8b --case full1.7b [--warmup 2 --timed 4]
    python bench/sft_throughput.py --case zero3-1.7b --gpus 2          # hpcqwen only, ZeRO-3 on 2 GPUs
    python bench/sft_throughput.py --case lora8b --cpu-smoke           # tiny shapes on CPU: plumbing only

Each case runs the baseline (bench/anchor/sft_bench.py: TRL SFTTrainer + PEFT + sdpa, exactly as
in ../shared/notes/gpu-anchor-sft.md) and then hpcqwen (`hpcqwen submit SPEC --backend local --wait`:
the real launcher, runner, data cache and callbacks) on a random-init model of the same Qwen3 shape,
and prints tokens/s, MFU (model FLOPs 6·N·T + causal attention, over the 989 TFLOP/s H100 peak and
over the matmul rate measured in the same call), peak memory, and the ratio. Tokens are real
(non-padding) tokens; the first `--warmup` optimizer steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK = 989e12  # H100/H200 dense bf16 datasheet

# case -> (size, baseline args (the harness as the anchor note ran it), hpcqwen task knobs,
#          data: (min_len, max_len) tokens per document)
CASES: dict[str, tuple[str, list[str], dict[str, object], tuple[int, int]]] = {
    "lora8b": ("8b", ["--mode", "lora", "--bs", "1", "--ga", "16", "--packing"],
               {"train_type": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 2e-4,
                "packing": True, "attn_impl": "flash_attn", "use_liger_kernel": True, "gradient_checkpointing": True,
                "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}, (256, 2048)),
    # Fixed 2048-token rows: SDPA (cuDNN / flash) beats the varlen kernel here (no GQA repeat), and 16 rows
    # per micro-batch without recompute fill the H200's memory (72 GiB) and the GEMMs.
    "full1.7b": ("1.7b", ["--mode", "full", "--bs", "8", "--ga", "1", "--fixed-len", "2048", "--liger"],
                 {"train_type": "full", "learning_rate": 1e-5, "packing": False, "attn_impl": "sdpa",
                  "use_liger_kernel": True, "gradient_checkpointing": False, "per_device_train_batch_size": 16,
                  "gradient_accumulation_steps": 1}, (2300, 2400)),
    "zero3-1.7b": ("1.7b", [], {"train_type": "full", "learning_rate": 1e-5, "packing": True, "attn_impl": "flash_attn",
                                "use_liger_kernel": True, "gradient_checkpointing": True, "deepspeed": "zero3",
                                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}, (256, 2048)),
}
# The baseline tuned like hpcqwen's run: the same micro-batch, accumulation, recompute, packing and fused
# kernels (Liger), so a ratio against it measures the stack, not the settings (issue 18).
TUNED: dict[str, list[str]] = {
    "lora8b": ["--mode", "lora", "--packing", "--liger", "--bs", "8", "--ga", "2", "--gc", "1"],
    "full1.7b": ["--mode", "full", "--bs", "16", "--ga", "1", "--fixed-len", "2048", "--liger", "--gc", "0"],
}
SHAPES_CPU = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32}


def matmul_params(c: dict[str, int]) -> int:
    """Weights that take part in matmuls (lm_head included, the embedding lookup not)."""
    h, L, nq, nkv, d, i, v = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                             c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["vocab_size"])
    return L * (h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * i) + v * h


def write_data(path: Path, tokenizer_dir: Path, n: int, lens: tuple[int, int], seed: int = 0) -> list[int]:
    """Conversations whose assistant turns hold random text of about U(lens) tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    sizes, rows = [], []
    for _ in range(n):
        k = rng.randint(*lens)
        ids = [rng.randint(1000, min(len(tok) - 100, 150000)) for _ in range(k)]
        rows.append({"messages": [{"role": "user", "content": "continue"},
                                  {"role": "assistant", "content": tok.decode(ids)}]})
        sizes.append(k)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return sizes


def build_model(out: Path, size: str, cpu: bool) -> tuple[Path, dict[str, int]]:
    """A random-init Qwen3 of the real shape (bf16, built on the GPU) with the full Qwen3 tokenizer."""
    from hpcqwen.testing import QWEN3_SHAPES, build_tiny_qwen3, build_tokenizer

    tok = build_tokenizer(out.with_name(out.name + "-tok"), truncated=cpu)
    shape = dict(SHAPES_CPU) if cpu else dict(QWEN3_SHAPES[size])
    shape["vocab_size"] = 4288 if cpu else 151936
    t0 = time.time()
    build_tiny_qwen3(out, tok, dtype="float32" if cpu else "bfloat16", device="cpu" if cpu else "cuda",
                     max_position_embeddings=40960, **shape)
    print(f"[{size}] model written in {time.time() - t0:.0f} s", flush=True)
    return out, shape


def run_hpcqwen(case: str, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """hpcqwen's runner through `hpcqwen submit --backend local --wait`; figures from metrics.jsonl."""
    size, _, knobs, lens = CASES[case]
    model, shape = build_model(work / f"model-{size}", size, args.cpu_smoke)
    over = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.knob)}
    per_step = int(over.get("per_device_train_batch_size", knobs["per_device_train_batch_size"])) \
        * int(over.get("gradient_accumulation_steps", knobs["gradient_accumulation_steps"])) * args.gpus
    steps = args.warmup + args.timed
    docs_per_row = 1.6 if knobs["packing"] else 1.0
    n_docs = int(per_step * steps * docs_per_row * 1.3) + 16
    sizes = write_data(work / f"data-{case}.jsonl", model, n_docs, (32, 200) if args.cpu_smoke else lens)
    task = {"kind": "sft", "model": str(model), "dataset": [str(work / f"data-{case}.jsonl")],
            "torch_dtype": "float32" if args.cpu_smoke else "bfloat16", "max_length": 2048, "max_steps": steps,
            "logging_steps": 1, "save_steps": 100000, "warmup_ratio": 0.0, **knobs}
    task.update({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.knob)})
    if args.cpu_smoke:
        task.update(use_liger_kernel=False, max_length=256)
    spec = {"name": f"bench-{case}", "cluster": {"profile": "local", "run_root": str(work / "runs")},
            "resources": {"nodes": 1, "gpus_per_node": 0 if args.cpu_smoke else args.gpus,
                          "nproc_per_node": args.gpus, "time_limit_min": 60},
            "requeue": {"enabled": False}, "task": task}
    spec_path = work / f"spec-{case}.json"
    spec_path.write_text(json.dumps(spec))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec_path), "--backend", "local", "--wait"],
                          capture_output=True, text=True, env=env)
    run_dir = Path(proc.stdout.split("run dir: ")[1].split()[0]) if "run dir: " in proc.stdout else None
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out")) if run_dir else proc.stderr
    if proc.returncode != 0 or run_dir is None:
        print(log[-4000:], flush=True)
        return {"name": f"hpcqwen-{case}", "ok": False, "error": proc.stderr[-800:]}
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics if "tokens_seen" in m and m.get("phase") == "train" and "loss" in m]
    first, last = timed[args.warmup - 1] if args.warmup else timed[0], timed[-1]
    dt, tokens = last["time"] - first["time"], last["tokens_seen"] - first["tokens_seen"]
    mean_len = statistics.mean(min(s, 2048) for s in sizes)
    sq_over_t = statistics.mean(min(s, 2048) ** 2 for s in sizes) / mean_len  # Σs²/T of the data
    tag = "".join(f" {kv}" for kv in args.knob)
    return summarize(f"hpcqwen-{case}{tag}", shape, tokens / dt, sq_over_t, knobs["train_type"] == "lora",
                     max(m.get("peak_mem_gb") or 0 for m in metrics), time.time() - t0, args,
                     losses=[round(m["loss"], 3) for m in timed])


def summarize(name: str, shape: dict[str, int], tok_s: float, sq_over_t: float, lora: bool, peak_gb: float,
              wall: float, args: argparse.Namespace, **extra: object) -> dict[str, object]:
    """tokens/s -> model TFLOP/s and MFU (6N, and 4N useful for LoRA, plus causal attention)."""
    n = matmul_params(shape)
    attn = 6.0 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * sq_over_t
    f6, fu = (6 * n + attn) * tok_s, ((4 if lora else 6) * n + attn) * tok_s
    out = {"name": name, "ok": True, "tokens_per_s": round(tok_s, 1), "model_tflops_6N": round(f6 / 1e12, 1),
           "mfu_6N_vs_989": round(f6 / PEAK, 4), "mfu_useful_vs_989": round(fu / PEAK, 4),
           "peak_alloc_GiB": peak_gb, "wall_s": round(wall, 1), **extra}
    if args.matmul_peak:
        out["mfu_6N_vs_measured"] = round(f6 / (args.matmul_peak * 1e12), 4)
    print("RESULT", json.dumps(out), flush=True)
    return out


def run_baseline(case: str, work: Path, args: argparse.Namespace, tuned: bool = False) -> dict[str, object]:
    """The anchor harness for the same shape: as the anchor note ran it, or `tuned` like hpcqwen's run."""
    size, extra, _, _ = CASES[case]
    extra = TUNED[case] if tuned else extra
    name = f"trl-{case}{'-tuned' if tuned else ''}"
    out = work / "baseline.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "anchor" / "sft_bench.py"), "--name", name,
           "--size", "tiny" if args.cpu_smoke else size, "--out", str(out), "--warmup", str(args.warmup),
           "--timed", str(args.timed), "--matmul-peak", str(args.matmul_peak), *extra]
    if args.cpu_smoke:
        cmd += ["--cpu", "--max-length", "256", "--min-len", "32"]
        cmd = [c for c in cmd if c != "--liger"]
        if "--fixed-len" in cmd:
            cmd[cmd.index("--fixed-len") + 1] = "256"
    subprocess.run(cmd, check=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    row = next((r for r in reversed(rows) if r["name"] == name), {"ok": False})
    keep = ("name", "ok", "tokens_per_s", "model_tflops_6N", "mfu_6N_vs_989", "mfu_useful_vs_989",
            "mfu_6N_vs_measured", "peak_alloc_GiB", "median_step_s", "error")
    return {k: row.get(k) for k in keep if k in row}


def main() -> None:
    """Run the cases and print one comparison line each."""
    p = argparse.ArgumentParser()
    p.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=4)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--matmul-peak", type=float, default=float(os.environ.get("MATMUL_PEAK", "0") or 0))
    p.add_argument("--work", default="/tmp/hpcqwen-bench")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                   help="override an hpcqwen task knob (value read as JSON), e.g. --knob attn_impl='\"sdpa\"'")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to test the plumbing")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for case in args.case:
        plain = None if args.no_baseline or not CASES[case][1] else run_baseline(case, work, args)
        tuned = None if args.no_baseline or case not in TUNED else run_baseline(case, work, args, tuned=True)
        ours = run_hpcqwen(case, work, args)
        print(compare_line(case, ours, plain, tuned), flush=True)


def compare_line(case: str, ours: dict[str, object], plain: dict[str, object] | None,
                 tuned: dict[str, object] | None) -> str:
    """`COMPARE case: hpcqwen X tok/s ... vs TRL as in the note Y (ratio) vs TRL tuned alike Z (ratio)`."""
    if not ours.get("ok"):
        return f"COMPARE {case}: hpcqwen failed: {ours.get('error')}"
    def side(label: str, row: dict[str, object] | None) -> str:
        if not row or not row.get("ok"):
            return f" vs {label}: not run"
        ratio = float(ours["tokens_per_s"]) / float(row["tokens_per_s"])  # type: ignore[arg-type]
        return (f" vs {label} {row['tokens_per_s']} tok/s (MFU {float(row['mfu_6N_vs_989']):.1%}, peak "  # type: ignore[arg-type]
                f"{row.get('peak_alloc_GiB')} GiB): {ratio:.2f}x")
    return (f"COMPARE {case}: hpcqwen {ours['tokens_per_s']} tok/s (MFU {float(ours['mfu_6N_vs_989']):.1%}, peak "  # type: ignore[arg-type]
            f"{ours['peak_alloc_GiB']} GiB)" + side("TRL as in the anchor note", plain)
            + side("TRL tuned alike", tuned))


if __name__ == "__main__":
    main()
