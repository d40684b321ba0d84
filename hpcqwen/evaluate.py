"""Accuracy of a model on held-out math rows, graded with GRPO's `accuracy` reward (math-verify).

A `task.kind: command` module (a pipeline's eval stage, or any job):

    task: {kind: command, module: hpcqwen.evaluate,
           args: [--model, "${stages.export.run_dir}/model", --dataset, data/math-tiny.jsonl#12]}

Each row's conversation (a final assistant turn dropped) is rendered as the distill runner renders
prompts (`render_prompt`), answered greedily by the same engines (`hpcqwen.inference`: transformers,
or vLLM with `--backend vllm`), and graded against its `solution` column by
`hpcqwen.rewards.accuracy_reward`, the reward GRPO trained with. A relative `--dataset` is relative to
the submitted spec's folder (a pipeline's: the pipeline file's), as path fields are. Rank 0 does the
work (run it with one process); it writes `TASK_DIR/eval.json` (accuracy, rows, correct, ungraded, per-row answers)
and a final metrics.jsonl line (`phase: done`, `accuracy`), so `hpcqwen queue` and `sweep report`
see it. `--dataset` takes the spec's `path[:subset][#N]` form (`#N`: a seeded sample of N rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpcqwen import fs
from hpcqwen.metrics import MetricsWriter

EVAL_FILE = "eval.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """--model DIR --dataset REF [--max-new-tokens N] [--enable-thinking] [--backend hf|vllm] [--seed N]."""
    p = argparse.ArgumentParser(prog="python -m hpcqwen.evaluate")
    p.add_argument("--model", required=True, help="a Hugging Face model folder (an export)")
    p.add_argument("--dataset", required=True, action="append", help="rows with messages and solution")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--enable-thinking", action="store_true", help="render with thinking (default: without)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def evaluate(args: argparse.Namespace, base_dir: Path) -> dict[str, Any]:
    """Generate, grade, summarise."""
    from hpcqwen.data.formats import load_dataset_rows
    from hpcqwen.data.tokenize import load_tokenizer, render_prompt
    from hpcqwen.inference import SamplingConfig, make_generator
    from hpcqwen.rewards.builtin import accuracy_reward

    rows = load_dataset_rows(args.dataset, base_dir=base_dir, seed=args.seed)
    tokenizer = load_tokenizer(args.model)
    prompts = [tokenizer(render_prompt(tokenizer, r["messages"], args.enable_thinking), add_special_tokens=False)
               ["input_ids"] for r in rows]
    generator = make_generator(args.backend, args.model, tokenizer, max_model_len=4096, seed=args.seed)
    sampling = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
    answers = [g.completions[0].text for g in generator.generate(prompts, sampling, [args.seed] * len(prompts))]
    scores = accuracy_reward(answers, solution=[r.get("solution", "") for r in rows])
    graded = [s for s in scores if s is not None]
    return {"model": args.model, "datasets": args.dataset, "rows": len(rows), "graded": len(graded),
            "correct": int(sum(graded)), "accuracy": sum(graded) / len(graded) if graded else None,
            "answers": [{"answer": a[:200], "score": s} for a, s in zip(answers, scores, strict=True)]}


def spec_folder(run_dir: Path) -> Path:
    """The folder of the spec (or pipeline file) the run was submitted from (its manifest's `spec`)."""
    from hpcqwen.rundir import read_manifest

    spec = read_manifest(run_dir).get("spec")
    return Path(str(spec)).parent if spec else run_dir


def main(argv: list[str]) -> int:
    """Rank 0 evaluates and writes eval.json and the metrics line; other ranks have nothing to do."""
    if os.environ.get("RANK", "0") != "0":
        return 0
    args = parse_args(argv)
    task_dir = Path(os.environ.get("HPCQWEN_TASK_DIR") or ".")
    start = time.time()
    MetricsWriter(task_dir / "metrics.jsonl").write({"step": 0, "phase": "eval"})
    result = evaluate(args, spec_folder(Path(os.environ.get("HPCQWEN_RUN_DIR") or ".")))
    result["seconds"] = round(time.time() - start, 1)
    fs.write_json_atomic(task_dir / EVAL_FILE, result)
    MetricsWriter(task_dir / "metrics.jsonl").write({"step": 1, "total_steps": 1, "phase": "done",
                                                     "accuracy": result["accuracy"], "rows": result["rows"]})
    print(f"evaluate: accuracy {result['accuracy']} ({result['correct']} of {result['graded']} graded rows, "
          f"{result['rows']} rows) of {args.model} in {result['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
