"""GRPO runner: TRL's GRPOTrainer on Qwen3 with hpcqwen's rewards, checkpoints and metrics.

`python -m hpcqwen.runners.grpo RUN_DIR`, started by the launcher on every process:
    load_context -> setup_process -> load_tokenizer -> load_prompts -> grpo_config (before the model: ZeRO-3)
    -> load_model -> build_trainer (rewards, callbacks) -> train (resume from the newest complete
    checkpoint) -> finish
The algorithm is TRL's and nothing is subclassed. Completions come from transformers `generate`,
or from vLLM (`use_vllm`, colocate or server) on GPU clusters, which TRL drives. Prompts are not
cached: they are rendered by TRL at every step, so there is nothing to tokenize ahead.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpcqwen import checkpoints
from hpcqwen.errors import HpcqwenError
from hpcqwen.inference import set_compile_cache_env
from hpcqwen.runners._shared import (
    RunContext,
    callback,
    finish_training,
    load_context,
    log0,
    resume_point,
    run_main,
    stop_before_training,
)
from hpcqwen.stopping import EXIT_STOPPED

COMPLETIONS = "completions.jsonl"  # in the task dir, next to metrics.jsonl
# TRL 1.16 GRPOTrainer log keys passed through to metrics.jsonl (prefixes): reward, reward_std,
# rewards/<name>/mean|std, completions/mean_length|clipped_ratio|..., kl, entropy, clip_ratio/...
GRPO_LOG_KEYS = ("reward", "completions/", "kl", "entropy", "clip_ratio", "frac_reward_zero_std", "num_tokens",
                 "step_time", "rollout/")


# ---- data ---------------------------------------------------------------------------------

def load_rows(refs: list[str], seed: int) -> list[dict[str, Any]]:
    """`{"messages": [...], **columns}` rows: local files through hpcqwen.data, hub ids through
    `datasets.load_dataset` (the nodes must be online, or HF_DATASETS_CACHE must hold it)."""
    from hpcqwen.data import load_dataset_rows
    from hpcqwen.data.formats import split_dataset_ref
    from hpcqwen.tasks._common import is_hub_id

    rows: list[dict[str, Any]] = []
    for ref in refs:
        if is_hub_id(split_dataset_ref(ref)[0]):
            rows += _hub_rows(ref, f"{seed}:0:{ref}")  # the seed load_dataset_rows([ref]) uses
        else:
            rows += load_dataset_rows([ref], base_dir="/", seed=seed)
    return rows


def _hub_rows(ref: str, seed: str) -> list[dict[str, Any]]:
    from datasets import load_dataset  # type: ignore[import-untyped]

    from hpcqwen.data.formats import normalize_row, parse_dataset_ref, sample_indices

    r = parse_dataset_ref(ref)
    data = load_dataset(r.path, r.subset or None, split="train")
    keep = sample_indices(len(data), r.count, seed=seed)
    return [normalize_row(dict(data[j]), r.path, j + 1) for j in keep]


def to_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """TRL's conversational prompt: the messages without a final assistant turn (the guide's GRPO
    format); every other column stays, and TRL passes it to the rewards as a keyword list."""
    messages = list(row["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return {"prompt": messages, **{k: v for k, v in row.items() if k != "messages"}}


def prompt_length(tokenizer: Any, messages: list[dict[str, Any]], enable_thinking: bool | None) -> int:
    """Tokens of the rendered prompt, generation header included."""
    from hpcqwen.data import render_prompt

    text = render_prompt(tokenizer, messages, enable_thinking=enable_thinking)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(ctx: RunContext, tokenizer: Any) -> tuple[Any, int]:
    """The prompt dataset and the number of prompts dropped for exceeding max_length.

    ms-swift's default truncation_strategy 'delete' drops over-long prompts; TRL 1.16 has no
    max_prompt_length, so the filter runs here (the same on every rank: no randomness).
    """
    from datasets import Dataset

    t = ctx.task
    prompts = [to_prompt(r) for r in load_rows(t.dataset, t.seed)]
    kept = [p for p in prompts if not t.max_length
            or prompt_length(tokenizer, p["prompt"], t.enable_thinking) <= t.max_length]
    per_step = t.generation_batch(ctx.world_size) // t.num_generations
    if len(kept) < per_step:
        raise HpcqwenError(f"{len(kept)} prompts left ({len(prompts) - len(kept)} longer than max_length "
                           f"{t.max_length} dropped) but one generation batch needs {per_step}",
                           where="task.dataset", hint="add prompts or raise max_length")
    return Dataset.from_list(kept), len(prompts) - len(kept)


# ---- the guide's knobs -> TRL --------------------------------------------------------------

def grpo_kwargs(task: Any, output_dir: str, use_gpu: bool, server: tuple[str, int, int] | None = None,
                longest_prompt: int = 0) -> dict[str, Any]:
    """GRPOConfig's arguments from the task, in one visible block (pure: unit-tested flag by flag).

    `server` is (host, port, NCCL group port) of the job's own rollout server (task.rollout; the launcher
    passes it); `longest_prompt` sizes the static KV cache, so that every step reuses one cache shape and the
    compiled decoding step is compiled once (transformers grows a static cache, and recompiles, whenever a
    longer prompt comes).

    Guide flags without a TRL field: `offload_model`, `offload_optimizer` and
    `gc_collect_after_offload` have no effect (TRL 1.16 does not offload the policy or its
    optimizer around rollouts; ZeRO-3 shards them, and `sleep_level` frees colocated vLLM's memory
    during training instead). `num_infer_workers` is checked at load (one engine per tensor-parallel
    group of processes is what TRL's colocate mode runs). `max_length` filters prompts in load_prompts.
    """
    from trl import GRPOConfig  # type: ignore[attr-defined]

    from hpcqwen.runners.trainer_args import shared_training_kwargs  # the same translation as SFT
    from hpcqwen.tracking import hf_report_to

    t = task
    return dict(
        **shared_training_kwargs(t, GRPOConfig, output_dir, use_gpu),
        # GRPO
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k,
        beta=t.beta,
        num_iterations=t.num_iterations,
        epsilon=t.epsilon,
        loss_type=t.loss_type,
        reward_weights=t.reward_weights,
        mask_truncated_completions=t.overlong_filter,  # ms-swift overlong_filter: no loss on truncated ones
        log_completions=False,  # hpcqwen writes completions.jsonl (GrpoLogCallback); TRL's prints rich tables
        chat_template_kwargs=None if t.enable_thinking is None else {"enable_thinking": t.enable_thinking},
        # transformers generation (use_vllm false): the whole generation batch of a step is one generate() call
        # (TRL: per_device_train_batch_size × steps_per_generation, which defaults to gradient_accumulation_steps)
        cache_implementation=t.cache_implementation,
        generation_kwargs={"max_cache_len": longest_prompt + t.max_completion_length}
        if t.cache_implementation == "static" and longest_prompt else None,
        # vLLM (GPU clusters only; refused at load on CPU)
        use_vllm=t.use_vllm,
        vllm_mode=t.vllm_mode,
        vllm_gpu_memory_utilization=t.vllm_gpu_memory_utilization,
        vllm_max_model_length=t.vllm_max_model_len,
        vllm_tensor_parallel_size=t.tensor_parallel_size,
        vllm_enable_sleep_mode=t.sleep_level > 0,  # TRL always sleeps at level 2 (weights re-synced anyway)
        vllm_server_host=server[0] if server else t.vllm_server_host or "0.0.0.0",
        vllm_server_port=server[1] if server else t.vllm_server_port,
        vllm_group_port=server[2] if server else 51216,  # TRL's default
        # hpcqwen's plumbing
        remove_unused_columns=False,  # the reward columns
        ddp_backend=None if use_gpu else "gloo",
        report_to=hf_report_to(task.report_to),  # where each writes: tracking.apply_tracking_env (setup_process)
        disable_tqdm=True,
    )


def grpo_config(ctx: RunContext, use_gpu: bool, server: tuple[str, int, int] | None, longest_prompt: int,
                run_name: str) -> Any:
    """The GRPOConfig, built before the model: with ZeRO-3, transformers' DeepSpeed config must be
    live when the model is created so that from_pretrained partitions the weights."""
    from trl import GRPOConfig  # type: ignore[attr-defined]

    return GRPOConfig(**grpo_kwargs(ctx.task, str(ctx.task_paths.checkpoints), use_gpu, server, longest_prompt),
                      run_name=run_name)


def longest_prompt(ctx: RunContext, tokenizer: Any, train: Any) -> int:
    """Tokens of the longest rendered prompt (sizes the static KV cache; 0 when it is not static)."""
    if ctx.task.cache_implementation != "static":
        return 0
    return max(prompt_length(tokenizer, row["prompt"], ctx.task.enable_thinking) for row in train)


def rollout_server(ctx: RunContext, use_gpu: bool) -> tuple[str, int, int] | None:
    """The job's own rollout server (task.rollout), which the launcher health-checked, named in the log.

    Raises:
        HpcqwenError: no server was passed, or the node has no GPU (TRL's weight sync into it needs NCCL).
    """
    from hpcqwen.rollout import rollout_env, served_model

    if ctx.task.rollout is None:
        return None
    server = rollout_env()
    if server is None:
        raise HpcqwenError("task.rollout is set but the launcher passed no server (HPCQWEN_VLLM_SERVER_HOST/PORT)",
                           hint="start the job through `hpcqwen submit`, which starts the server")
    url = f"http://{server[0]}:{server[1]}"
    model = served_model(url)
    log0(ctx, f"grpo: rollout server {url} serves {model}; NCCL weight-sync group port {server[2]}")
    if not use_gpu:
        raise HpcqwenError(f"the rollout server at {url} answers (it serves {model}), but TRL 1.16 syncs the "
                           "policy's weights into it over NCCL, which needs CUDA: a rollout server trains on GPU "
                           "nodes only", where="task.rollout", hint="run on GPU nodes, or drop rollout and use_vllm")
    return server


def load_model(ctx: RunContext) -> Any:
    """The policy in torch_dtype (TRL adds the LoRA adapters from `lora_config`)."""
    import torch
    from transformers import AutoModelForCausalLM

    t = ctx.task
    return AutoModelForCausalLM.from_pretrained(t.model, dtype=getattr(torch, t.torch_dtype),
                                                attn_implementation="sdpa")


def lora_config(task: Any) -> Any:
    """peft LoraConfig for train_type lora, else None. TRL applies it (with its ZeRO-3 dtype fix),
    and with beta > 0 the reference log-probs come from the model with the adapters disabled."""
    if task.train_type != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=task.lora_rank, lora_alpha=task.lora_alpha, lora_dropout=task.lora_dropout,
                      target_modules=task.target_modules, task_type="CAUSAL_LM")


def load_rewards(task: Any, run_dir: Path | None = None) -> list[Any]:
    """Reward functions for TRL, each wrapped so a failing one stops the step naming itself (a plugin by the
    file the spec named; the run dir's copy is what runs)."""
    from hpcqwen.inputs import original_names
    from hpcqwen.rewards.plugins import RewardOptions, resolve_rewards, trl_reward

    # ms-swift sets cosine_max_len to max_completion_length when it is unset.
    options = RewardOptions(cosine_max_len=task.max_completion_length)
    names = original_names(run_dir) if run_dir is not None else {}

    def shown(ref: str) -> str:
        path, colon, func = ref.rpartition(":")
        return f"{names[path]}:{func}" if colon and path in names else ref

    return [trl_reward(shown(name), fn) for name, fn in resolve_rewards(task.reward_funcs, "/", options)]


# ---- callbacks and trainer -----------------------------------------------------------------

class RolloutClock:
    """Seconds per optimizer step spent generating, syncing weights into vLLM and waking or putting it to sleep.

    TRL 1.16 times these blocks only for wandb/mlflow/trackio, so `attach` wraps the bound methods of this
    trainer's own objects (no TRL class is changed); a call inside a timed call counts once, in the outer one
    (sync_weights wakes the weights up itself). The rest of a step's `step_time` is training.
    """

    KEYS = ("rollout/generate_s", "rollout/weight_sync_s", "rollout/sleep_wake_s")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self.depth = 0
        self.last_step = 0

    def wrap(self, obj: Any, name: str, key: str) -> None:
        """Time `obj.name(...)` into `key` (the GPU work it queued included)."""
        import torch

        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return inner(*args, **kwargs)
            self.depth, started = 1, time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.totals[key] += time.perf_counter() - started
                self.depth = 0

        setattr(obj, name, timed)

    def attach(self, trainer: Any, is_rank0: bool) -> None:
        """Wrap the generation path this trainer uses (vLLM colocate or server, or transformers)."""
        generate, sync, sleep_wake = self.KEYS
        vg = getattr(trainer, "vllm_generation", None) if trainer.args.use_vllm else None
        if vg is None:
            self.wrap(trainer.model, "generate", generate)
            return
        self.wrap(vg, "sync_weights", sync)
        if vg.mode == "colocate":
            self.wrap(vg.llm, "generate", generate)
            self.wrap(vg.llm, "sleep", sleep_wake)
            self.wrap(vg.llm, "wake_up", sleep_wake)
        elif is_rank0:  # only the main process talks to the server
            self.wrap(vg.vllm_client, "generate", generate)

    def take(self, step: int) -> dict[str, float]:
        """Per-step means since the last call, then start over."""
        steps = max(step - self.last_step, 1)
        out = {k: round(v / steps, 4) for k, v in self.totals.items() if v}
        self.totals, self.last_step = dict.fromkeys(self.KEYS, 0.0), step
        return out


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_completions(path: Path, step: int, buffers: Mapping[str, Any]) -> int:
    """Append the latest generation batch (TRL's gathered buffers) to completions.jsonl, one line per
    completion, then empty the buffers so a batch is written once. Returns the lines written."""
    from hpcqwen.rewards.builtin import completion_text

    prompts, completions = list(buffers["prompt"]), list(buffers["completion"])
    rewards = {name: list(values) for name, values in buffers["rewards"].items()}
    advantages = list(buffers["advantages"])
    with open(path, "a", encoding="utf-8") as f:
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=False)):
            record = {"step": step, "prompt": prompt, "completion": completion_text(completion),
                      "rewards": {n: _plain(v[i]) for n, v in rewards.items() if i < len(v)},
                      "advantage": _plain(advantages[i]) if i < len(advantages) else None}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    for value in buffers.values():
        for buffer in value.values() if isinstance(value, Mapping) else [value]:
            buffer.clear()
    return len(prompts)


def grpo_log_callback(completions: Path | None, is_rank0: bool) -> Any:
    """A callback that adds `reward_mean` (the monitor's key) to TRL's logs and, with
    log_completions, writes completions.jsonl. It must come before MetricsCallback, which reads
    the same `logs` dict. (Built here so that importing this module stays free of transformers.)"""
    from transformers import TrainerCallback

    class GrpoLogCallback(TrainerCallback):
        trainer: Any = None  # set by build_trainer: the completions live in GRPOTrainer._logs (TRL 1.16)
        clock = RolloutClock()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> Any:
            if logs is not None and "reward" in logs:
                logs["reward_mean"] = logs["reward"]
                logs.update(self.clock.take(state.global_step))
            buffers = getattr(self.trainer, "_logs", None)
            if completions is not None and is_rank0 and buffers and buffers["prompt"]:
                write_completions(completions, state.global_step, buffers)
            return control

    return GrpoLogCallback()


def build_trainer(ctx: RunContext, args: Any, model: Any, tokenizer: Any, train: Any) -> Any:
    """GRPOTrainer with the rewards and the run-dir callbacks (stop, checkpoints, metrics)."""
    from trl import GRPOTrainer  # type: ignore[attr-defined]

    from hpcqwen.runners.callbacks import (
        CheckpointCallback,
        HeartbeatCallback,
        MetricsCallback,
        RunCounters,
        StopCallback,
    )

    t = ctx.task
    log_cb = grpo_log_callback(ctx.task_paths.dir / COMPLETIONS if t.log_completions else None, ctx.is_rank0)
    counters = RunCounters(None)  # TRL counts num_input_tokens_seen (prompt + completion) itself
    callbacks = [StopCallback(ctx.task_paths, ctx.is_rank0),
                 CheckpointCallback(ctx.task_paths.checkpoints, t.save_total_limit, ctx.is_rank0, counters),
                 log_cb, MetricsCallback(ctx.task_paths.metrics, ctx.is_rank0, counters, extra_keys=GRPO_LOG_KEYS),
                 HeartbeatCallback("generate")]
    if "mlflow" in t.report_to:
        from hpcqwen.tracking import mlflow_run_callback

        callbacks.append(mlflow_run_callback(ctx.task_paths.dir))
    started = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=load_rewards(t, ctx.paths.root), args=args, train_dataset=train,
                          processing_class=tokenizer, callbacks=callbacks, peft_config=lora_config(t))
    log0(ctx, f"grpo: trainer built in {time.perf_counter() - started:.1f} s"
              + (f" (vLLM {t.vllm_mode} engine included)" if t.use_vllm and t.vllm_mode == "colocate" else ""))
    if t.compile_generation:
        trainer.generation_config.disable_compile = False  # TRL 1.16 always sets it; the task asked to compile
    log_cb.trainer = trainer
    log_cb.clock.attach(trainer, ctx.is_rank0)
    return trainer


def describe(ctx: RunContext, trainer: Any, n_prompts: int, dropped: int) -> None:
    """Print the derived numbers once: batch arithmetic, rewards, generation backend, parameters."""
    t = ctx.task
    batch = t.generation_batch(ctx.world_size)
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in trainer.model.parameters()]  # ZeRO-3
    trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    backend = f"vLLM {t.vllm_mode}" if t.use_vllm else "transformers generate"
    log0(ctx, f"grpo: {t.train_type} on {ctx.world_size} processes, {n_prompts} prompts ({dropped} over "
              f"max_length dropped); generation batch {batch} completions = {batch // t.num_generations} prompts × "
              f"{t.num_generations} generations ({t.per_device_train_batch_size} × {t.gradient_accumulation_steps} "
              f"accumulation × {ctx.world_size}); {backend}, ≤ {t.max_completion_length} new tokens; rewards "
              f"{', '.join(t.reward_funcs)} (weights {t.reward_weights or 'all 1'}); beta {t.beta:g}, lr {t.lr:g}, "
              f"trainable {trainable:,} of {total:,} parameters")
    if t.offload_model or t.offload_optimizer or t.gc_collect_after_offload:
        log0(ctx, "grpo: offload_model/offload_optimizer/gc_collect_after_offload have no effect with TRL "
                  "(no offload around rollouts); sleep_level > 0 frees colocated vLLM memory instead")


def setup_process(ctx: RunContext) -> tuple[bool, str]:
    """Environment (trackers included), device and (for ZeRO) DeepSpeed's process group; (True on a GPU node,
    the trackers' run name)."""
    import torch

    from hpcqwen.tracking import apply_tracking_env

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ctx.spec.cluster.cache_dir / "torch_extensions"))
    run_name = apply_tracking_env(ctx.task.report_to, ctx.spec.name, ctx.paths.root, ctx.task_paths.dir)
    set_compile_cache_env(str(ctx.spec.cluster.cache_dir))  # vLLM, torch.compile
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(ctx.local_rank)
    if ctx.task.deepspeed:
        import torch._dynamo  # noqa: F401, I001 - imported inside zero.Init's Tensor.__new__ patch it breaks it
        import deepspeed  # type: ignore[import-untyped]

        # As in the SFT runner: before GRPOConfig, so that ZeRO-3's zero.Init sees the real world size
        # (else it asserts train_batch_size != micro_batch × accumulation × 1), with gloo on CPU.
        from hpcqwen.runners.trainer_args import collective_timeout

        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", timeout=collective_timeout())
    return use_gpu, run_name


def main(run_dir: str) -> int:
    """Train with GRPO, resuming from the newest complete checkpoint of the task dir."""
    from transformers import set_seed

    from hpcqwen.data import open_tokenizer

    ctx = load_context(run_dir)
    use_gpu, run_name = setup_process(ctx)
    tokenizer, template_note = open_tokenizer(ctx.task.model, ctx.task.chat_template)
    log0(ctx, f"grpo: {template_note}")
    train, dropped = load_prompts(ctx, tokenizer)
    args = grpo_config(ctx, use_gpu, rollout_server(ctx, use_gpu), longest_prompt(ctx, tokenizer, train), run_name)
    set_seed(ctx.task.seed)
    trainer = build_trainer(ctx, args, load_model(ctx), tokenizer, train)
    describe(ctx, trainer, len(train), dropped)
    if stop_before_training(ctx, "grpo"):
        return EXIT_STOPPED
    resume = resume_point(ctx, ctx.task_paths.checkpoints)
    checkpointing = callback(trainer, "CheckpointCallback")
    checkpointing.counters.resume_from(checkpoints.read_marker(resume) if resume else {})
    log0(ctx, f"grpo: resuming from {resume}" if resume else "grpo: starting from step 0")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return finish_training(ctx, trainer, callback(trainer, "StopCallback"), checkpointing.pruner, "grpo")


if __name__ == "__main__":
    run_main(main)
