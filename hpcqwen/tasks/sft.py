"""`task.kind: sft` — LoRA or full fine-tuning of Qwen3. Knobs keep ms-swift's names (the guide's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from hpcqwen.data.formats import split_dataset_ref
from hpcqwen.fields import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_PROCS_PER_NODE,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    SPEC_CONFIG,
)
from hpcqwen.tasks._common import (
    DEEPSPEED_HELP,
    MULTI_TURN_HELP,
    REPORT_TO_HELP,
    TRUNCATION_HELP,
    BuiltinRunner,
    DatasetRefs,
    DeepSpeedRef,
    ModelKnobs,
    MultiTurnMode,
    ReportTo,
    TruncationStrategy,
    check_report_to,
    default_report_to,
)

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView

# Attention implementations that honour the per-sequence position_ids of a packed row (varlen), so
# packed sequences do not attend to each other (see tests/cpu_train/test_data_packing.py).
VARLEN_ATTN = ("flash_attn", "sdpa", "eager")


class SftTask(BuiltinRunner, ModelKnobs):
    """Supervised fine-tuning, as `swift sft` in the Qwen3 guide (the run dir is the output dir)."""

    model_config = SPEC_CONFIG
    kind: Literal["sft"] = "sft"
    num_train_epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="Epochs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                  description="Total optimizer steps; overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="Micro batch per process.")
    per_device_eval_batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="Eval batch per process.")
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                   description="Evaluate every N steps (default: save_steps).")
    save_steps: int = Field(500, ge=1, le=MAX_STEPS, description="Save a complete checkpoint every N steps.")
    save_total_limit: int | None = Field(None, ge=1, le=MAX_STEPS,
                                         description="Keep at most N checkpoints (never the newest).")
    save_only_model: bool = Field(False, description="Skip optimizer/scheduler/RNG state in checkpoints.")
    logging_steps: int = Field(5, ge=1, le=MAX_STEPS, description="Write metrics every N steps.")
    max_length: int = Field(2048, ge=16, le=MAX_TOKENS, description="Longest example in tokens (see "
                            "truncation_strategy); the pack size with packing.")
    truncation_strategy: TruncationStrategy = Field("delete", description=TRUNCATION_HELP)
    packing: bool = Field(False, description="Pack examples padding-free into rows of max_length.")
    attn_impl: Literal["sdpa", "flash_attn", "eager"] = Field(
        "sdpa", description="Attention kernel; flash_attn is varlen FlashAttention-2 (the flash-attn package, else "
        "torch's own varlen kernel), the fast choice with packing."
    )
    deepspeed: DeepSpeedRef = Field(None, description=DEEPSPEED_HELP)
    use_liger_kernel: bool = Field(False, description="Liger's fused kernels (GPU only).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    dataloader_num_workers: int = Field(0, ge=0, le=MAX_PROCS_PER_NODE, description="DataLoader worker processes.")
    dataset_num_proc: int = Field(1, ge=1, le=MAX_PROCS_PER_NODE,
                                  description="Processes for tokenization (cache build).")
    report_to: ReportTo = Field(default_factory=default_report_to, description=REPORT_TO_HELP)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for sampling, init and data order.")
    dataset: DatasetRefs = Field(description="Training data: 'path[:subset][#N]', one or a list.")
    val_dataset: DatasetRefs = Field(default_factory=list, description="Evaluation data, same syntax.")
    split_dataset_ratio: float = Field(0.0, ge=0, lt=1, description="Hold out this fraction for eval.")
    loss_scale: Literal["default", "ignore_empty_think"] = Field(
        "default", description="ignore_empty_think: no loss on an empty <think></think> block and the newlines after "
        "it (the answer keeps the loss of every token it has).")
    multi_turn: MultiTurnMode = Field("all_rounds", description=MULTI_TURN_HELP)
    model_name: list[str] | str | None = Field(None, description="Fills {{NAME}} (zh and en names as a list).")
    model_author: list[str] | str | None = Field(None, description="Fills {{AUTHOR}}.")
    system: str | None = Field(None, description="Default system prompt.")
    enable_thinking: bool | None = Field(None, description="Render with (True) or without (False) thinking.")

    def check(self, spec: SpecView) -> list[Problem]:
        """Cross-field checks (no files read: model, data and DeepSpeed files are hpcqwen.preflight's)."""
        from hpcqwen.errors import Problem

        p: list[Problem] = []
        if self.packing and self.attn_impl not in VARLEN_ATTN:
            p.append(Problem("task.attn_impl", f"packing needs an attention that keeps packed sequences apart "
                             f"({', '.join(VARLEN_ATTN)})", got=self.attn_impl, hint="set attn_impl: flash_attn"))
        gpu = spec.gpus_per_node > 0
        if self.use_liger_kernel and not gpu:
            p.append(Problem("task.use_liger_kernel", "Liger's Triton kernels need GPUs but resources.gpus_per_node "
                             "is 0", got="true", expected="false on CPU"))
        p += check_report_to("task.report_to", self.report_to, spec)
        if self.save_only_model and spec.requeue.enabled:
            zero3 = (" (with ZeRO-3, not even the optimizer shards)"
                     if (self.deepspeed or "").startswith("zero3") else "")
            p.append(Problem("task.save_only_model", f"checkpoints without optimizer, scheduler and RNG state{zero3} "
                             "cannot resume a requeued job", got="true",
                             hint="set save_only_model: false, or requeue: {enabled: false}"))
        return p + self._check_batch(spec)

    def warnings(self, spec: SpecView) -> list[Problem]:
        """Settings that are valid but do nothing (printed on submit, not errors)."""
        from hpcqwen.errors import Problem

        if "eval_steps" in self.model_fields_set and not self.val_dataset and self.split_dataset_ratio == 0:
            return [Problem("task.eval_steps", "evaluation is off: there is nothing to evaluate (no val_dataset, "
                            "split_dataset_ratio 0)", got=str(self.eval_steps),
                            hint="set split_dataset_ratio (ms-swift's default: 0.01) or val_dataset, or drop "
                            "eval_steps")]
        return []

    def _check_batch(self, spec: SpecView) -> list[Problem]:
        from hpcqwen.errors import Problem

        counts = [split_dataset_ref(r)[2] for r in self.dataset]
        if any(c is None or not c.isdigit() for c in counts):
            return []  # whole files: their sizes are checked by the runner
        rows = sum(int(c or 0) for c in counts)
        need = self.per_device_train_batch_size * spec.world_size
        if rows < need:
            return [Problem("task.per_device_train_batch_size", f"one step needs {need} examples "
                            f"(per_device_train_batch_size {self.per_device_train_batch_size} × {spec.world_size} "
                            f"processes) but the datasets give {rows}", got=str(self.per_device_train_batch_size),
                            expected=f"<= {rows // spec.world_size or 1}")]
        return []
