"""The data cache at scale, measured side by side in one call (issue 13, item 4).

1. Time to first step of an SFT with 8 ranks on 2 nodes (4 per node), submitted through the real
   `hpcqwen submit` to the local Slurm cluster (cluster/local/up): with a cold cache (the job
   tokenizes the data) and then a warm one (it only finds and maps the entry).
2. The build time of one entry against `dataset_num_proc` on a generated JSONL of long
   reasoning-style rows (~200 MB by default), each build in a fresh process and cache; the
   entries' bytes are compared across process counts.

    .venv/bin/python bench/cache_scale.py            # full: 20 MB for (1), 200 MB and num_proc 1, 2, 4 for (2)
    .venv/bin/python bench/cache_scale.py --ci       # small and quick (tests/slurm/test_cache_bench.py)

Prints the figures and their ratios as Markdown tables (for bench/RESULTS.md); `--json PATH`
writes them too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
         "this", "are", "or", "from", "at", "which", "but", "have", "an", "they", "you", "were", "she", "there",
         "one", "all", "we", "their", "so", "if", "then", "than", "when", "what", "why", "how", "can", "must",
         "will", "would", "should"]
# cpus_per_task 1: the local nodes' CPUs are advertised, not real (2 cores in all), and the job must fit
# beside other users' jobs on the shared cluster; the 4 ranks of a node share what the machine has.
SPEC = """name: bench-cache-{tag}
cluster: {{profile: local, run_root: {runs}, cache_root: {cache}}}
resources: {{nodes: 2, nproc_per_node: 4, cpus_per_task: 1, time_limit_min: 30}}
env: {{OMP_NUM_THREADS: '1'}}
task:
  kind: sft
  model: {model}
  dataset: [{data}]
  torch_dtype: float32
  max_steps: 2
  logging_steps: 1
  save_steps: 1000
  per_device_train_batch_size: 1
  max_length: 256
  truncation_strategy: right  # the rows are longer: keep them (delete would drop every one)
  gradient_checkpointing: false
  dataset_num_proc: {num_proc}
"""
BUILD = """
import json, sys, time
from hpcqwen.data import prepare_sft_dataset
from hpcqwen.data.cachekey import sft_key_parts
data, tok, cache, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sft_key_parts([data], base_dir="/", tokenizer_dir=tok, options={})  # the data's digest, memoized: not timed
t0 = time.perf_counter()
p = prepare_sft_dataset([data], tokenizer_dir=tok, cache_root=cache, max_length=1024, base_dir="/",
                        truncation_strategy="right", num_proc=num_proc)  # keep the long rows: same work
took = time.perf_counter() - t0
files = json.loads((p.path / "COMPLETE").read_text())["files"]
print(json.dumps({"seconds": took, "rows": p.stats["num_rows"], "files": files}))
"""


def write_jsonl(path: Path, megabytes: float, answer_words: int, seed: int = 0) -> int:
    """A JSONL of `megabytes` of chat rows with long reasoning answers; returns the row count."""
    rng = random.Random(seed)
    rows = 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < megabytes * 1e6:
            think = " ".join(rng.choice(WORDS) for _ in range(answer_words))
            answer = " ".join(rng.choice(WORDS) for _ in range(answer_words // 2))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(40)) + "?"},
                {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n{answer}"}]}) + "\n")
            rows += 1
    return rows


def submit(spec: Path) -> tuple[str, Path, float]:
    """`hpcqwen submit` on the cluster; (job id, run dir, submit time)."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "slurm"],
                         capture_output=True, text=True, check=True).stdout
    job, run_dir = out.split("submitted job ")[1].split("  run dir: ")
    return job.strip(), Path(run_dir.split()[0]), t0


def first_step_time(run_dir: Path, job: str, timeout_s: float) -> float:
    """The `time` of the first metrics record with a loss (step 1), waiting for the job to reach it."""
    end = time.time() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.time() < end:
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if record.get("step", 0) >= 1 and "loss" in record:
                    return float(record["time"])
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
            raise SystemExit(f"job {job} ended without a first step:\n{logs[-3000:]}")
        time.sleep(0.2)
    raise SystemExit(f"no first step of job {job} within {timeout_s:.0f} s")


def wait_gone(job: str, timeout_s: float = 600) -> None:
    """Until the job left the queue (so the next run gets the whole cluster)."""
    end = time.time() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.time() > end:
            subprocess.run(["scancel", job], check=False)
            raise SystemExit(f"job {job} still queued after {timeout_s:.0f} s")
        time.sleep(0.5)


def launch_time(run_dir: Path) -> float:
    """When the launcher started on node 0 (launches.jsonl, whole seconds)."""
    import datetime as dt

    first = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[0])
    return dt.datetime.fromisoformat(first["time"]).timestamp()


def time_to_first_step(work: Path, megabytes: float, num_proc: int) -> dict[str, Any]:
    """Cold then warm: the same spec twice on one cache root."""
    from hpcqwen.testing import build_tiny_qwen3, build_tokenizer

    model = build_tiny_qwen3(work / "model", build_tokenizer(work / "tok-tiny", truncated=True))
    rows = write_jsonl(work / "ttfs.jsonl", megabytes, answer_words=300, seed=1)
    spec = work / "ttfs.yaml"
    spec.write_text(SPEC.format(tag=uuid.uuid4().hex[:6], runs=work / "runs", cache=work / "cache", model=model,
                                data=work / "ttfs.jsonl", num_proc=num_proc))
    out: dict[str, Any] = {"ttfs_mb": megabytes, "ttfs_rows": rows}
    for phase in ("cold", "warm"):
        job, run_dir, t0 = submit(spec)
        step = first_step_time(run_dir, job, timeout_s=900)
        out[f"{phase}_submit_to_step_s"] = step - t0
        out[f"{phase}_start_to_step_s"] = step - launch_time(run_dir)
        wait_gone(job)
        entries = [p for p in (work / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
        out[f"{phase}_entries"] = [(p.name, (p / "COMPLETE").stat().st_mtime_ns) for p in entries]
    out["warm_rebuilt"] = out["warm_entries"] != out["cold_entries"]
    return out


def build_scaling(work: Path, megabytes: float, procs: list[int]) -> dict[str, Any]:
    """One fresh build per process count, each in its own Python process and cache root."""
    from hpcqwen.testing import build_tokenizer

    tok = build_tokenizer(work / "tok-full", truncated=False)
    rows = write_jsonl(work / "build.jsonl", megabytes, answer_words=1500)
    out: dict[str, Any] = {"build_mb": (work / "build.jsonl").stat().st_size / 1e6, "build_rows": rows, "builds": {}}
    files = {}
    for n in procs:
        done = subprocess.run([sys.executable, "-c", BUILD, str(work / "build.jsonl"), str(tok),
                               str(work / f"cache-{n}"), str(n)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"build with num_proc {n} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        out["builds"][n] = result["seconds"]
        files[n] = result["files"]
    out["identical_bytes"] = all(f == files[procs[0]] for f in files.values())
    return out


def environment() -> dict[str, str]:
    """The machine and the versions the figures come from."""
    slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
    libs = {n: version(n) for n in ("hpcqwen", "datasets", "tokenizers", "transformers", "torch")}
    return {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(), "slurm": slurm, **libs}


def report(env: dict[str, str], ttfs: dict[str, Any], build: dict[str, Any]) -> str:
    """The Markdown tables, ratios included."""
    lines = [f"machine: {env['machine']}; Python {env['python']}, {env['slurm']}, "
             + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("machine", "python", "slurm")), "",
             f"Time to first step, SFT with 8 ranks on 2 nodes (`hpcqwen submit`, local Slurm), "
             f"{ttfs['ttfs_mb']:g} MB JSONL ({ttfs['ttfs_rows']} rows):", "",
             "| cache | submit → first step | job start → first step |", "|---|---|---|"]
    for phase in ("cold", "warm"):
        submit_s, start_s = ttfs[f"{phase}_submit_to_step_s"], ttfs[f"{phase}_start_to_step_s"]
        lines.append(f"| {phase} | {submit_s:.1f} s | {start_s:.0f} s |")
    lines.append(f"| cold / warm | {ttfs['cold_submit_to_step_s'] / ttfs['warm_submit_to_step_s']:.2f}x | "
                 f"{ttfs['cold_start_to_step_s'] / max(ttfs['warm_start_to_step_s'], 1):.2f}x |")
    lines.append(f"\nwarm run rebuilt the entry: {'yes' if ttfs['warm_rebuilt'] else 'no'}\n")
    lines += [f"Build time against dataset_num_proc, {build['build_mb']:.0f} MB JSONL ({build['build_rows']} rows, "
              "real Qwen3 tokenizer, max_length 1024):", "", "| dataset_num_proc | build | speed-up vs 1 |",
              "|---|---|---|"]
    base = build["builds"][min(build["builds"])]
    lines += [f"| {n} | {s:.1f} s | {base / s:.2f}x |" for n, s in build["builds"].items()]
    lines.append(f"\nidentical bytes across dataset_num_proc: {'yes' if build['identical_bytes'] else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    """Run both measurements and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ci", action="store_true", help="small sizes: 1 MB for (1), 3 MB and num_proc 1, 2 for (2)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    ttfs_mb, build_mb, procs = (1.0, 3.0, [1, 2]) if args.ci else (20.0, 200.0, [1, 2, 4])
    with tempfile.TemporaryDirectory(prefix="hpcqwen-cache-bench-") as tmp:
        work = Path(tmp)
        ttfs = time_to_first_step(work, ttfs_mb, num_proc=2)
        build = build_scaling(work, build_mb, procs)
    env = environment()
    print(report(env, ttfs, build))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, **ttfs, **build}, indent=1))


if __name__ == "__main__":
    main()
