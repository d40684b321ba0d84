"""Distill runner: batch generation over this array task's shards, resumable, then the merge.

`python -m hpcqwen.runners.distill RUN_DIR`, started by the launcher (under torchrun when a GPU node
runs several engines: one process per `tensor_parallel_size` GPUs):
    load_context -> choose_engine (may re-exec under the vLLM venv) -> place_engine -> plan
    -> build_generator -> generate_shards -> finish (done markers; the merge once every shard is done)
Engine r of E takes every E-th prompt of a shard; all engines append to the shard's one file under
its lock. On a restart (requeue, resubmit) every id already in the file is skipped, so no prompt is
generated twice. A stop request (SIGTERM/SIGUSR2 or STOP: `hpcqwen.stopping`) ends the run after the
current batch (at most STOP_CHECK_PROMPTS prompts, so a stop never waits for 1,000 generations) with
exit 75; a batch cut short by the engine dying of the same signal is simply not written.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcqwen import heartbeat, stopping
from hpcqwen.metrics import MetricsWriter
from hpcqwen.runners._shared import RunContext, load_context, log0, run_main
from hpcqwen.shards import (
    DistillError,
    ShardFile,
    incomplete_shards,
    mark_done,
    merge_shards,
    shard_file,
    shard_ids,
    shards_of_task,
)

# The launcher's rendezvous variables: each engine is an independent process (vLLM builds its own TP group).
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
STOP_CHECK_PROMPTS = 256  # prompts per generate call at most: the stop check runs between calls


@dataclass
class Plan:
    """What this engine does: the prompts, and per shard the ids still to generate."""

    rows: list[dict[str, Any]]
    n_shards: int
    shards: list[int]
    pending: dict[int, list[int]] = field(default_factory=dict)  # shard -> ids this engine generates
    written: dict[int, int] = field(default_factory=dict)  # shard -> lines in its file

    @property
    def total(self) -> int:
        """Prompts owned by this task's shards."""
        return sum(len(shard_ids(len(self.rows), self.n_shards, s)) for s in self.shards)


def choose_engine(ctx: RunContext, run_dir: str) -> str:
    """'vllm' or 'hf'; re-execs this runner under task.vllm_python when vLLM lives there."""
    from hpcqwen.inference import ensure_engine

    t = ctx.task
    return ensure_engine(t.infer_backend, t.vllm_python, ["-m", "hpcqwen.runners.distill", run_dir])


def place_engine(ctx: RunContext) -> None:
    """Give this engine its slice of the node's GPUs, and drop torchrun's rendezvous variables."""
    tp, r = ctx.task.tensor_parallel_size, ctx.local_rank
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if ctx.spec.gpus_per_node and ctx.world_size > 1:
        devices = visible.split(",") if visible else [str(i) for i in range(ctx.spec.gpus_per_node)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[r * tp:(r + 1) * tp])
    for name in TORCHRUN_VARS:
        os.environ.pop(name, None)
    from hpcqwen.inference import set_compile_cache_env

    set_compile_cache_env(str(ctx.spec.cluster.cache_dir))


def plan(ctx: RunContext) -> Plan:
    """Load the prompts; find this task's shards and, for this engine, the ids not yet written."""
    from hpcqwen.data.formats import load_dataset_rows

    t = ctx.task
    rows = load_dataset_rows(t.dataset, base_dir="/", seed=t.seed, system=t.system)
    array_size = ctx.spec.array.count if ctx.spec.array else 1
    index = int(os.environ.get("HPCQWEN_ARRAY_TASK_ID") or 0)
    shards = shards_of_task(index, array_size, t.shards)
    out = Plan(rows, t.shards, shards)
    for s in shards:
        sf = ShardFile(shard_file(ctx.paths.root, s))
        with sf.lock:
            cut = sf.repair()  # a writer killed mid-line leaves a torn tail
            done = sf.read()
        if cut:
            print(f"distill: shard {s}: cut a torn last line ({cut} bytes)", flush=True)
        ids = shard_ids(len(rows), t.shards, s)
        check_same_prompts(sf.path, ids, done, rows)
        out.pending[s] = [i for k, i in enumerate(ids) if k % ctx.world_size == ctx.rank and i not in done]
        out.written[s] = sf.count_lines()
    return out


def check_same_prompts(path: Path, ids: range, done: dict[int, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Ids are positions in the prompt list: a restart must see the list the written answers came from."""
    from hpcqwen.tasks.distill import prompt_messages

    for i, record in done.items():
        if i not in ids or record["messages"] != prompt_messages(rows[i]["messages"]):
            raise DistillError(f"prompt {i} in {path.name} is not prompt {i} of the dataset now: the data files "
                               "changed since this run started", where=str(path),
                               hint="restore the data files, or submit the spec again (a new run dir)")


def build_generator(ctx: RunContext, backend: str, tokenizer: Any) -> Any:
    """Load the model into the chosen engine."""
    from hpcqwen.inference import make_generator

    t = ctx.task
    return make_generator(backend, t.model, tokenizer, adapters=t.adapters, dtype=t.torch_dtype,
                          max_model_len=t.max_model_len, max_batch_size=t.max_batch_size,
                          tensor_parallel_size=t.tensor_parallel_size,
                          gpu_memory_utilization=t.gpu_memory_utilization, seed=t.seed)


def generate_batch(ctx: RunContext, generator: Any, tokenizer: Any, rows: list[dict[str, Any]],
                   ids: list[int]) -> tuple[list[dict[str, Any]], int]:
    """Shard records for `ids` (prompts over max_model_len are recorded as skipped) and tokens generated."""
    from hpcqwen.data.tokenize import render_prompt
    from hpcqwen.inference import SamplingConfig
    from hpcqwen.tasks.distill import prompt_messages

    t = ctx.task
    sampling = SamplingConfig(t.temperature, t.top_p, t.top_k, t.max_new_tokens, t.num_return_sequences)
    messages = {i: prompt_messages(rows[i]["messages"]) for i in ids}
    tokens = {i: tokenizer(render_prompt(tokenizer, messages[i], t.enable_thinking, t.response_prefix),
                           add_special_tokens=False)["input_ids"] for i in ids}
    fits = [i for i in ids if len(tokens[i]) < t.max_model_len]
    answers = generator.generate([tokens[i] for i in fits], sampling, [t.seed + i for i in fits])
    generations = dict(zip(fits, answers, strict=True))
    records, generated = [], 0
    for i in ids:
        record: dict[str, Any] = {"id": i, "messages": messages[i], "assistant_prefix": t.assistant_prefix}
        if i in generations:
            record.update(generations[i].to_record())
            generated += sum(c.completion_tokens for c in generations[i].completions)
        else:
            record.update(prompt_tokens=len(tokens[i]), completions=[],
                          skipped=f"prompt of {len(tokens[i])} tokens does not fit max_model_len {t.max_model_len}")
        records.append(record)
    return records, generated


def generate_shards(ctx: RunContext, generator: Any, tokenizer: Any, work: Plan) -> bool:
    """Generate every pending id in batches; False when a stop request cut the run short."""
    t, metrics = ctx.task, MetricsWriter(ctx.task_paths.metrics)
    size = min(t.write_batch_size, STOP_CHECK_PROMPTS)
    for s in work.shards:
        sf, pending = ShardFile(shard_file(ctx.paths.root, s)), work.pending[s]
        for start in range(0, len(pending), size):
            if stopping.requested(ctx.task_paths.stop):
                print(f"distill: stop requested; shard {s} stops with {work.written[s]} prompts written", flush=True)
                return False
            batch = pending[start:start + size]
            heartbeat.beat("generate", sum(work.written.values()))
            t0 = time.time()
            try:
                records, generated = generate_batch(ctx, generator, tokenizer, work.rows, batch)
            except Exception:
                if stopping.requested(ctx.task_paths.stop):  # the engine's processes got the same TERM
                    print(f"distill: the engine ended during a stop; shard {s} keeps {work.written[s]} prompts",
                          flush=True)
                    return False
                raise
            heartbeat.beat("save", sum(work.written.values()))
            work.written[s] = sf.append(records)
            heartbeat.beat("generate", sum(work.written.values()))
            stopping.mark_progress(ctx.task_paths.progress)
            dt = max(time.time() - t0, 1e-9)
            done = sum(work.written.values())
            # Each engine measures its own rate; engines of a task are alike, so the task's is E times it.
            metrics.write({"step": done, "total_steps": work.total, "done": done, "total": work.total,
                           "tokens_per_s": round(generated / dt * ctx.world_size, 1),
                           "prompts_per_s": round(len(batch) / dt * ctx.world_size, 3), "batch_s": round(dt, 2),
                           "shard": s, "engine": ctx.rank, "phase": "generate"})
            print(f"distill: shard {s}: {work.written[s]}/{len(shard_ids(len(work.rows), t.shards, s))} written "
                  f"(engine {ctx.rank}: +{len(batch)} prompts, {generated} tokens, {generated / dt:.1f} tokens/s)",
                  flush=True)
    return True


def finish(ctx: RunContext, work: Plan) -> None:
    """Mark complete shards; merge when every shard of the run is complete (any task may be the last)."""
    t = ctx.task
    complete = [s for s in work.shards if mark_done(ctx.paths.root, s, shard_ids(len(work.rows), t.shards, s))]
    MetricsWriter(ctx.task_paths.metrics).write({
        "step": sum(work.written.values()), "total_steps": work.total, "done": sum(work.written.values()),
        "total": work.total, "shards_done": len(complete), "phase": "done" if len(complete) == len(work.shards)
        else "generate"})
    missing = incomplete_shards(ctx.paths.root, t.shards)
    if missing:
        print(f"distill: shards {complete} complete; the merge waits for shards {missing}", flush=True)
        return
    result = merge_shards(ctx.paths.root, t.shards, t.num_return_sequences, t.result_file(ctx.paths.root))
    print(f"distill: merged {result.rows} rows ({result.prompts} prompts × {t.num_return_sequences}, "
          f"{result.skipped} skipped as too long) into {result.path}", flush=True)


def main(run_dir: str) -> int:
    """Generate this task's shards (skipping what is written), then mark and merge."""
    ctx = load_context(run_dir)
    t = ctx.task
    backend = choose_engine(ctx, run_dir)
    place_engine(ctx)
    from hpcqwen.data.tokenize import open_tokenizer

    tokenizer, template_note = open_tokenizer(t.model, t.chat_template)
    log0(ctx, f"distill: {template_note}")
    work = plan(ctx)
    todo = sum(len(v) for v in work.pending.values())
    log0(ctx, f"distill: {len(work.rows)} prompts in {t.shards} shards; this task: shards {work.shards} "
              f"({work.total} prompts, {sum(work.written.values())} written); {ctx.world_size} engine(s) × "
              f"tensor_parallel_size {t.tensor_parallel_size}, backend {backend} ({sys.executable}); "
              f"× {t.num_return_sequences} answers, batches of {t.write_batch_size}")
    print(f"distill: engine {ctx.rank}: {todo} prompts to generate", flush=True)
    if todo:
        t0 = time.time()
        generator = build_generator(ctx, backend, tokenizer)
        print(f"distill: engine {ctx.rank}: {backend} engine ready in {time.time() - t0:.1f} s", flush=True)
        if not generate_shards(ctx, generator, tokenizer, work):
            return stopping.EXIT_STOPPED
    finish(ctx, work)
    return 0


if __name__ == "__main__":
    run_main(main)
