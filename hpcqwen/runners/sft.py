"""SFT runner: LoRA or full fine-tuning of Qwen3 on transformers + peft (+ DeepSpeed ZeRO).

`python -m hpcqwen.runners.sft RUN_DIR`, started by the launcher on every process:
    load_context -> load_tokenizer -> load_data (shared cache) -> training_arguments
    -> load_model -> build_trainer -> train (resume from the newest complete checkpoint)
The data is tokenized with our own Qwen3 loss masks and packing, so the plain transformers Trainer
fits (TRL's SFTTrainer would re-tokenize); nothing is subclassed. With `HPCQWEN_PREPARE_ONLY=1`
(set by `hpcqwen prepare`) the runner builds the data cache and stops.
"""

from __future__ import annotations

import os
from typing import Any

from hpcqwen import checkpoints
from hpcqwen.runners._shared import (
    RunContext,
    callback,
    finish_training,
    load_context,
    log0,
    resume_point,
    run_main,
    stop_before_training,
    train_and_eval,
)
from hpcqwen.runners.trainer_args import collective_timeout, shared_training_kwargs
from hpcqwen.stopping import EXIT_STOPPED

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def load_data(ctx: RunContext, tokenizer_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    """Train and eval datasets from the shared cache (built once by one process)."""
    from hpcqwen.caching import CacheSettings

    t = ctx.task
    options = dict(tokenizer_dir=tokenizer_dir, base_dir="/", cache_root=str(ctx.spec.cluster.cache_dir),
                   max_length=t.max_length, loss_scale=t.loss_scale, packing=t.packing,
                   enable_thinking=t.enable_thinking, multi_turn=t.multi_turn,
                   truncation_strategy=t.truncation_strategy, chat_template=t.chat_template, seed=t.seed,
                   model_name=t.model_name, model_author=t.model_author, system=t.system,
                   num_proc=t.dataset_num_proc, cache=CacheSettings.from_profile(ctx.spec.cluster))
    return train_and_eval(ctx, options)


def training_arguments(ctx: RunContext, use_gpu: bool, run_name: str) -> Any:
    """The guide's knobs translated into TrainingArguments, in one visible block.

    Built before the model: with ZeRO-3, transformers' DeepSpeed config must be live when the
    model is created so that from_pretrained partitions the weights.
    """
    from transformers import TrainingArguments

    from hpcqwen.tracking import hf_report_to

    t = ctx.task
    return TrainingArguments(
        **shared_training_kwargs(t, TrainingArguments, str(ctx.task_paths.checkpoints), use_gpu),
        save_only_model=t.save_only_model,
        eval_strategy="steps" if (t.val_dataset or t.split_dataset_ratio) else "no",
        eval_steps=t.eval_steps or t.save_steps,
        use_liger_kernel=t.use_liger_kernel,
        remove_unused_columns=False,
        # Counted by TokenCounter in the collator when it runs in this process (no per-step GPU sync).
        include_num_input_tokens_seen="no" if t.dataloader_num_workers == 0 else "non_padding",
        ddp_backend=None if use_gpu else "gloo",
        report_to=hf_report_to(t.report_to),  # where each writes: tracking.apply_tracking_env (in main)
        run_name=run_name,
        disable_tqdm=True,
    )


def load_model(ctx: RunContext, use_gpu: bool) -> Any:
    """The model (weights in torch_dtype), wrapped in LoRA adapters for train_type lora."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpcqwen.attention import implementation

    t = ctx.task
    model = AutoModelForCausalLM.from_pretrained(
        t.model, dtype=getattr(torch, DTYPES[t.torch_dtype]), attn_implementation=implementation(t.attn_impl))
    if t.train_type == "full":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                        target_modules=t.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build_trainer(ctx: RunContext, args: Any, model: Any, tokenizer: Any, train: Any, evaluation: Any) -> Any:
    """A plain transformers Trainer with the run-dir callbacks (stop, checkpoints, metrics)."""
    from transformers import Trainer

    from hpcqwen.data import PackedCollator, PaddingCollator
    from hpcqwen.runners.callbacks import (
        CheckpointCallback,
        HeartbeatCallback,
        MetricsCallback,
        RunCounters,
        StopCallback,
        TokenCounter,
    )

    t = ctx.task
    collator: Any = (PackedCollator(return_flash_attn_kwargs=t.attn_impl == "flash_attn") if t.packing
                     else PaddingCollator(pad_token_id=tokenizer.pad_token_id))
    counter = TokenCounter(collator) if t.dataloader_num_workers == 0 else None
    counters = RunCounters(counter)
    callbacks = [StopCallback(ctx.task_paths, ctx.is_rank0),
                 CheckpointCallback(ctx.task_paths.checkpoints, t.save_total_limit, ctx.is_rank0, counters),
                 MetricsCallback(ctx.task_paths.metrics, ctx.is_rank0, counters), HeartbeatCallback("eval")]
    if "mlflow" in t.report_to:
        from hpcqwen.tracking import mlflow_run_callback

        callbacks.append(mlflow_run_callback(ctx.task_paths.dir))

    class CountingTrainer(Trainer):
        """Evaluation batches go through the plain collator: eval tokens are not training tokens (the
        dataset is never modified: a cache entry may be read-only, another user's)."""

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            self.data_collator = collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = counter or collator

    return CountingTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                           data_collator=counter or collator, processing_class=tokenizer, callbacks=callbacks)


def describe(ctx: RunContext, trainer: Any, n_train: int) -> None:
    """Print the derived numbers once (global batch, steps, trainable parameters)."""
    t = ctx.task
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * ctx.world_size
    # ZeRO-3 leaves each rank an empty placeholder per parameter; ds_numel is the full size (as in GRPO).
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in trainer.model.parameters()]
    trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    log0(ctx, f"sft: {t.train_type} on {ctx.world_size} processes, {n_train} training rows, global batch "
              f"{global_batch} ({t.per_device_train_batch_size} × {t.gradient_accumulation_steps} accumulation "
              f"× {ctx.world_size}), lr {t.lr:g}, trainable {trainable:,} of {total:,} parameters")


def main(run_dir: str) -> int:
    """Train (or, with HPCQWEN_PREPARE_ONLY=1, only build the data cache)."""
    import torch

    ctx = load_context(run_dir)
    t = ctx.task
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ctx.spec.cluster.cache_dir / "torch_extensions"))
    from hpcqwen.tracking import apply_tracking_env

    run_name = apply_tracking_env(t.report_to, ctx.spec.name, ctx.paths.root, ctx.task_paths.dir)
    from hpcqwen.data import open_tokenizer

    tokenizer, template_note = open_tokenizer(t.model, t.chat_template)
    log0(ctx, f"sft: {template_note}")
    train, evaluation, stats = load_data(ctx, t.model)
    if os.environ.get("HPCQWEN_PREPARE_ONLY") == "1":
        log0(ctx, "sft: data cache ready (prepare only)")
        return 0
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(ctx.local_rank)
    if t.deepspeed:
        import deepspeed  # type: ignore[import-untyped]
        import torch._dynamo  # noqa: F401 - imported inside zero.Init's Tensor.__new__ patch it breaks it

        # Before TrainingArguments: ZeRO-3's zero.Init must see the real world size (else it
        # asserts train_batch_size != micro_batch × accumulation × 1), and gloo on CPU.
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", timeout=collective_timeout())
    args = training_arguments(ctx, use_gpu, run_name)  # joins the process group
    from transformers import set_seed

    set_seed(t.seed)  # LoRA's initial A matrices (and a full model's nothing) come from this RNG
    model = load_model(ctx, use_gpu)
    trainer = build_trainer(ctx, args, model, tokenizer, train, evaluation)
    describe(ctx, trainer, len(train))
    if stop_before_training(ctx, "sft"):
        return EXIT_STOPPED
    resume = resume_point(ctx, ctx.task_paths.checkpoints)
    checkpointing = callback(trainer, "CheckpointCallback")
    checkpointing.counters.resume_from(checkpoints.read_marker(resume) if resume else {})
    log0(ctx, f"sft: resuming from {resume}" if resume else "sft: starting from step 0")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return finish_training(ctx, trainer, callback(trainer, "StopCallback"), checkpointing.pruner, "sft",
                           {"fill_ratio": stats.get("fill_ratio")})


if __name__ == "__main__":
    run_main(main)
