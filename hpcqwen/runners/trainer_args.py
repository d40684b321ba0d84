"""What SFT and GRPO translate alike into transformers' arguments (TrainingArguments / GRPOConfig): the
guide's knobs, hpcqwen's ZeRO presets as DeepSpeed configs, and the collective timeout every
process group of theirs uses. One home, so the two runners cannot drift apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcqwen import heartbeat


def zero_config(preset: str) -> dict[str, Any]:
    """DeepSpeed config for zero2 / zero3 / zero3_offload ("auto" values are filled by transformers), or
    the config file's (any other value: the run dir's copy, whatever its name)."""
    from hpcqwen.tasks._common import ZERO_PRESETS

    if preset not in ZERO_PRESETS:
        config: dict[str, Any] = json.loads(Path(preset).read_text(encoding="utf-8"))
        return config
    stage = 2 if preset == "zero2" else 3
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    if preset == "zero3_offload":
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": True},
                    offload_param={"device": "cpu", "pin_memory": True})
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            # Trainer builds torch's AdamW; DeepSpeed would refuse it without this.
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def shared_training_kwargs(t: Any, cls: Any, output_dir: str, use_gpu: bool) -> dict[str, Any]:
    """The TrainingArguments knobs SFT and GRPO (GRPOConfig) translate alike, from the guide's names."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler_type,
        **warmup_kwargs(cls, t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # pruned by CheckpointCallback, which never drops the newest complete one
        bf16=use_gpu and t.torch_dtype == "bfloat16",
        fp16=use_gpu and t.torch_dtype == "float16",
        use_cpu=not use_gpu,
        deepspeed=zero_config(t.deepspeed) if t.deepspeed else None,
        **checkpointing_kwargs(cls, t.gradient_checkpointing),
        ddp_find_unused_parameters=has_experts(t.model),
        dataloader_num_workers=t.dataloader_num_workers,
        seed=t.seed,
        data_seed=t.seed,
        # longer than every watchdog allowance: the watchdog dumps the stacks of a hang first (DESIGN.md)
        ddp_timeout=int(heartbeat.collective_timeout_s(1800)),
    )


def has_experts(model: str) -> bool:
    """Whether DDP must search for unused parameters: only in a mixture-of-experts model (an expert no token was
    routed to has no gradient in that step). A dense model, LoRA or full, uses every trainable parameter each
    step; there the search costs an extra pass over the autograd graph, and torch warns about it on every rank."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return True  # not readable here: keep DDP's safe search (loading the model reports the real problem)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def checkpointing_kwargs(cls: Any, on: bool) -> dict[str, Any]:
    """transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    import dataclasses

    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(cls)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def warmup_kwargs(cls: Any, ratio: float) -> dict[str, float]:
    """transformers >= 5.20 dropped warmup_ratio: a float warmup_steps in [0, 1) is the ratio."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


def collective_timeout() -> Any:
    """torch.distributed's timeout as a timedelta (see heartbeat.collective_timeout_s)."""
    import datetime

    return datetime.timedelta(seconds=heartbeat.collective_timeout_s(1800))
