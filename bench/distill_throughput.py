"""Distillation throughput: prompts/s and generated tokens/s of the vLLM engine against the transformers
engine, on one fixed prompt set, in one run, side by side (the engines the distill runner uses).

    .venv/bin/python bench/distill_throughput.py [--size tiny|small] [--prompts 64] [--max-new-tokens 64]
                                                 [--max-batch-size 16] [--repeat 3]
    .venv/bin/python bench/distill_throughput.py --model DIR      # any local Qwen3 folder
    python bench/distill_throughput.py --size 0.6b --keep-model DIR  # GPU; DIR/qwen3-0.6b for bench/distill-gpu.yaml

Each engine runs in its own process on the same token-id prompts (rendered once by hpcqwen, thinking
off); vLLM runs under .venv-vllm (scripts/setup-vllm.sh) when the main venv lacks it. Engine start-up is
timed apart from generation; a warm-up call over every prompt (16 tokens) precedes the timed ones. On
CPU both engines get every core (vLLM's OpenMP threads are bound to all of them, none reserved). The
random models rarely emit an end of turn, so nearly every answer runs to --max-new-tokens. --variants
times vLLM again with one sampling setting changed at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # hpcqwen from this checkout when it is not installed (a carried copy)
SIZES: dict[str, dict[str, object]] = {  # random Qwen3 shapes (hpcqwen.testing); head_dim >= 32 for vLLM's CPU
    "tiny": dict(),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
    # the real Qwen3 shapes and vocabulary (GPU: built in bf16 on the device)
    "0.6b": {"qwen3": "0.6b", "vocab_size": 151936},
    "1.7b": {"qwen3": "1.7b", "vocab_size": 151936},
}


def fixed_prompts(n: int) -> list[list[dict[str, str]]]:
    """n user turns: the shipped sft-tiny prompts, cycled, each made unique."""
    rows = [json.loads(x) for x in (REPO / "jobspecs/data/sft-tiny.jsonl").read_text().splitlines()]
    users = [r["messages"][0]["content"] for r in rows]
    return [[{"role": "user", "content": f"{users[i % len(users)]} (request {i})"}] for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    """Inside one engine's process: load, warm up, time, print one JSON line."""
    from hpcqwen.data.tokenize import load_tokenizer, render_prompt
    from hpcqwen.inference import SamplingConfig, make_generator

    tok = load_tokenizer(args.model)
    ids = [tok(render_prompt(tok, m, enable_thinking=False), add_special_tokens=False)["input_ids"]
           for m in fixed_prompts(args.prompts)]
    sampling = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    gen = make_generator(args.worker, args.model, tok, dtype=args.dtype, max_model_len=args.max_model_len,
                         max_batch_size=args.max_batch_size, seed=42)  # the distill runner's engine (seed 42)
    init_s = time.perf_counter() - t0
    # Warm-up on every prompt (a few tokens): vLLM's first call at a large batch pays a one-time cost (on the
    # H200 the first 128-prompt call took 12.7 s, the same call right after it 2.0 s); two prompts miss it.
    gen.generate(ids, dataclasses.replace(sampling, max_new_tokens=min(16, args.max_new_tokens)), list(range(len(ids))))
    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = gen.generate(ids, sampling, list(range(len(ids))))
        runs.append((time.perf_counter() - t0, sum(c.completion_tokens for g in out for c in g.completions)))
    gen_s, tokens = sorted(runs)[len(runs) // 2]  # the median run (the same seeds give the same answers)
    variants = sampling_variants(gen, ids, args.max_new_tokens) if args.variants and args.worker == "vllm" else {}
    print("RESULT " + json.dumps({"engine": args.worker, "init_s": init_s, "gen_s": gen_s, "prompts": len(ids),
                                  "tokens": tokens, "python": sys.executable, "variants": variants}), flush=True)


def sampling_variants(gen: object, ids: list[list[int]], max_new: int) -> dict[str, list[float]]:
    """The same engine and prompts with one sampling choice changed at a time (a request seed each, as the
    runner asks for reproducible answers; top-k/top-p): [seconds, generated tokens] per variant."""
    from vllm import SamplingParams

    llm = gen.llm  # type: ignore[attr-defined]
    stop = gen.stop_ids  # type: ignore[attr-defined]
    cases = {
        "runner (seed per request, top_k 20, top_p 0.95)": lambda i: dict(seed=i, top_k=20, top_p=0.95),
        "no request seed, top_k 20, top_p 0.95": lambda i: dict(top_k=20, top_p=0.95),
        "seed per request, no top_k/top_p": lambda i: dict(seed=i),
        "no request seed, no top_k/top_p": lambda i: dict(),
        "no request seed, no top_k/top_p, ignore_eos": lambda i: dict(ignore_eos=True),
    }
    out = {}
    for name, extra in cases.items():
        params = [SamplingParams(temperature=0.6, max_tokens=max_new, stop_token_ids=stop, **extra(i))
                  for i in range(len(ids))]
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        out[name] = [time.perf_counter() - t0, sum(len(c.token_ids) for o in res for c in o.outputs)]
    return out


def run_engine(engine: str, python: str, args: argparse.Namespace, model: Path) -> dict[str, float]:
    argv = [python, __file__, "--worker", engine, "--model", str(model), "--prompts", str(args.prompts),
            "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype,
            "--max-batch-size", str(args.max_batch_size), "--repeat", str(args.repeat),
            "--max-model-len", str(args.max_model_len)] + (["--variants"] if args.variants else [])
    # vLLM on CPU binds its OpenMP threads and by default keeps one core for its front-end process; give it
    # every core, as torch gets in the transformers process, so both engines compute on the same cores.
    defaults = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if args.cache_root:  # vLLM's compile caches where the distill runner keeps them (cluster.cache_root)
        from hpcqwen.inference import compile_cache_env

        defaults |= compile_cache_env(args.cache_root)
    proc = subprocess.run(argv, capture_output=True, text=True, env={**defaults, **os.environ}, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


def main() -> None:
    """Build (or take) the model, run both engines, print the table and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local Qwen3 folder (default: a random model of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16, help="transformers: prompts per generate() call")
    p.add_argument("--dtype", default="float32", help="both engines (vLLM would pick bfloat16 on CPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed generate() calls per engine; the median counts")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM's max_model_len")
    p.add_argument("--cache-root", default=None, help="vLLM compile caches (a cluster's cache_root)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-model", type=Path, default=None,
                   help="build the random model in this folder (reused when there) and keep it")
    p.add_argument("--variants", action="store_true",
                   help="vLLM: also time the same prompts with one sampling setting changed at a time")
    p.add_argument("--engines", default="hf,vllm", help="which engines to run (default both)")
    p.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from hpcqwen.inference import vllm_importable
    from hpcqwen.tasks.distill import default_vllm_python

    vllm_python = sys.executable if vllm_importable() else default_vllm_python()
    if vllm_python is None:
        sys.exit("no vLLM: run scripts/setup-vllm.sh (or set HPCQWEN_VLLM_PYTHON)")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(args.keep_model or Path(tmp), args.size)
        params = model_params(model)
        pythons = {"hf": sys.executable, "vllm": vllm_python}
        results = [run_engine(e, pythons[e], args, model) for e in args.engines.split(",")]
    print(f"model: {args.model or args.size} ({params / 1e6:.1f} M parameters), {args.prompts} prompts × "
          f"{args.max_new_tokens} new tokens, temperature 0.6, {args.dtype}; transformers batches of "
          f"{args.max_batch_size}; median of {args.repeat} runs; {os.cpu_count()} CPU cores")
    print(f"{'engine':<14}{'start s':>9}{'generate s':>12}{'prompts/s':>11}{'tokens/s':>10}")
    rates = {}
    for r in results:
        rates[r["engine"]] = (r["prompts"] / r["gen_s"], r["tokens"] / r["gen_s"])
        name = {"hf": "transformers", "vllm": "vllm"}[str(r["engine"])]
        print(f"{name:<14}{r['init_s']:>9.1f}{r['gen_s']:>12.2f}{rates[r['engine']][0]:>11.1f}"
              f"{rates[r['engine']][1]:>10.0f}")
    if len(rates) == 2:
        print(f"vllm / transformers: prompts/s {rates['vllm'][0] / rates['hf'][0]:.1f}x, "
              f"tokens/s {rates['vllm'][1] / rates['hf'][1]:.1f}x")
    for r in results:
        for name, (seconds, tokens) in (r.get("variants") or {}).items():
            print(f"  vllm {name}: {seconds:.2f} s, {tokens / seconds:,.0f} tokens/s")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "params": params, "results": results}, indent=1) + "\n")


def build_model(folder: Path, size: str) -> Path:
    import torch

    from hpcqwen.testing import QWEN3_SHAPES, build_tiny_qwen3, build_tokenizer

    if (folder / f"qwen3-{size}" / "config.json").is_file():
        return folder / f"qwen3-{size}"
    tok = build_tokenizer(folder / "tokenizer")
    shape = dict(SIZES[size])
    if "qwen3" in shape:
        shape = {**QWEN3_SHAPES[str(shape.pop("qwen3"))], **shape}
        if torch.cuda.is_available():
            shape |= {"dtype": "bfloat16", "device": "cuda"}
    return build_tiny_qwen3(folder / f"qwen3-{size}", tok, **shape)


def model_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 - not a dict
    return total


if __name__ == "__main__":
    main()
