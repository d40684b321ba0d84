"""`task.kind: megatron` — SFT of Qwen3 / Qwen3-MoE on megatron-core, the guide's `megatron sft` knobs.

Every flag of the guide's Megatron-SWIFT command (Qwen3-30B-A3B, 2 nodes × 8 GPUs) is a field of
the same name. The parallel layout is checked here against the resources; `hpcqwen.preflight` checks
it against the model's own numbers (experts, heads, layers from a local `load` folder's config.json),
so a layout megatron-core would reject fails `hpcqwen submit`, not the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, WrapValidator

from hpcqwen import specfile
from hpcqwen.fields import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FACTOR,
    MAX_LR,
    MAX_PARALLEL,
    MAX_PROCS_PER_NODE,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    SPEC_CONFIG,
)
from hpcqwen.tasks._common import (
    CHAT_TEMPLATE_HELP,
    MULTI_TURN_HELP,
    REPORT_TO_HELP,
    TRUNCATION_HELP,
    BuiltinRunner,
    ChatTemplateMode,
    DatasetRefs,
    ModelRef,
    MultiTurnMode,
    ReportTo,
    TruncationStrategy,
    check_report_to,
    default_report_to,
)

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView


def _folder(value: Any, handler: Any, info: ValidationInfo) -> Any:
    value = handler(value)
    context = info.context or {}
    if value is None or "base_dir" not in context:  # unset, or a frozen spec.json: already resolved
        return value
    return specfile.expand_path(value, context["base_dir"])


Folder = Annotated[str | None, WrapValidator(_folder)]
"""A folder path, absolute after load (relative to the spec's folder; `~` and `${VAR}` expanded)."""


class MegatronTask(BuiltinRunner, BaseModel):
    """Supervised fine-tuning on megatron-core, as `megatron sft` in the Qwen3 guide."""

    model_config = SPEC_CONFIG
    kind: Literal["megatron"] = "megatron"
    load: ModelRef = Field(description="Hugging Face model folder (or hub id when the nodes are online), or a "
                           "megatron checkpoint written by hpcqwen (an iter_<n> folder or its checkpoints/ folder).")
    dataset: DatasetRefs = Field(description="Training data: 'path[:subset][#N]', one or a list.")
    val_dataset: DatasetRefs = Field(default_factory=list, description="Evaluation data, same syntax.")
    split_dataset_ratio: float = Field(0.0, ge=0, lt=1, description="Hold out this fraction for eval.")
    tensor_model_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL,
                                            description="TP: GPUs that split each weight matrix.")
    pipeline_model_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL,
                                              description="PP: GPUs that split the layers into stages.")
    expert_model_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL,
                                            description="EP: GPUs that split the experts of a MoE layer.")
    context_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL,
                                       description="CP: GPUs that split each sequence (needs TE).")
    sequence_parallel: bool = Field(False, description="Split norms/dropout activations over the TP ranks.")
    moe_grouped_gemm: bool = Field(False, description="All local experts in grouped GEMMs (TE's TEGroupedMLP, "
                                   "else torch.nn.functional.grouped_mm) instead of one GEMM per expert.")
    moe_shared_expert_overlap: bool = Field(False, description="Accepted, no effect: Qwen3-MoE has no shared expert.")
    moe_aux_loss_coeff: float | None = Field(
        None, ge=0, le=MAX_FACTOR, description="Weight of the MoE load-balancing loss; default: the model config's "
        "router_aux_loss_coef (Qwen3-MoE: 0.001), as transformers and ms-swift use it; 0 turns it off.")
    micro_batch_size: int = Field(1, ge=1, le=MAX_BATCH,
                                  description="Rows (packs with packing) per GPU per micro-batch.")
    global_batch_size: int = Field(16, ge=1, le=MAX_BATCH,
                                   description="Rows per optimizer step over all data-parallel ranks.")
    packing: bool = Field(False, description="Pack examples padding-free into rows of max_length (THD).")
    recompute_granularity: Literal["full", "selective"] | None = Field(None, description="Activation recompute.")
    recompute_method: Literal["uniform", "block"] | None = Field(None, description="Which layers to recompute "
                                                                 "(recompute_granularity full).")
    recompute_num_layers: int | None = Field(None, ge=1, le=MAX_PARALLEL,
                                             description="Layers per recompute group (full).")
    train_iters: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; or set max_epochs.")
    max_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS,
                                   description="Epochs over the training rows when train_iters is unset.")
    eval_iters: int = Field(100, ge=0, le=MAX_STEPS, description="Micro-batch rounds per evaluation.")
    eval_interval: int | None = Field(None, ge=1, le=MAX_STEPS,
                                      description="Evaluate every N iterations (default: save_interval).")
    save_interval: int = Field(500, ge=1, le=MAX_STEPS, description="Save a complete checkpoint every N iterations.")
    save: Folder = Field(None, description="Checkpoint folder (shared FS); default <task dir>/checkpoints. Array "
                             "tasks save into <save>/tasks/<index>. A later submission with the same folder "
                             "resumes from its newest complete checkpoint; two live runs cannot share it.")
    save_total_limit: int | None = Field(None, ge=1, le=MAX_STEPS, description="Keep at most this many complete "
                                         "iter_* folders (the newest is never deleted); default: keep all.")
    finetune: bool = Field(False, description="From an mcore `load`: weights only, iteration and optimizer reset.")
    no_save_optim: bool = Field(False, description="Leave the optimizer state out of checkpoints (no resume).")
    no_save_rng: bool = Field(False, description="Leave the RNG states out of checkpoints.")
    cross_entropy_loss_fusion: bool = Field(False, description="Megatron's fused vocab-parallel cross entropy.")
    use_flash_attn: bool = Field(False, description="Flash attention: TE's, else torch SDPA / varlen flash.")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = Field(
        "auto", description="TransformerEngine modules (auto: when installed on the nodes) or megatron's local ones.")
    lr: float = Field(1e-5, gt=0, le=MAX_LR, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, le=MAX_LR, description="Learning rate at the end of the decay.")
    lr_warmup_iters: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up iterations.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    weight_decay: float = Field(0.1, ge=0, le=MAX_FACTOR, description="AdamW weight decay.")
    clip_grad: float = Field(1.0, gt=0, le=MAX_FACTOR, description="Gradient clipping norm.")
    max_length: int = Field(2048, ge=16, le=MAX_TOKENS, description="Longest example in tokens (see "
                            "truncation_strategy); the pack size with packing.")
    truncation_strategy: TruncationStrategy = Field("delete", description=TRUNCATION_HELP)
    multi_turn: MultiTurnMode = Field("all_rounds", description=MULTI_TURN_HELP)
    chat_template: ChatTemplateMode = Field("auto", description=CHAT_TEMPLATE_HELP)
    log_interval: int = Field(5, ge=1, le=MAX_STEPS, description="Write metrics every N iterations.")
    num_workers: int = Field(1, ge=0, le=MAX_PROCS_PER_NODE,
                             description="Accepted, no effect: batches come from the memory-mapped "
                             "cache in the training process.")
    dataset_num_proc: int = Field(1, ge=1, le=MAX_PROCS_PER_NODE,
                                  description="Processes for tokenization (cache build); also the CPU cores of "
                                  "the `hpcqwen prepare` job.")
    report_to: ReportTo = Field(default_factory=default_report_to, description=REPORT_TO_HELP)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for data order and initialisation.")

    def check(self, spec: SpecView) -> list[Problem]:
        """Cross-field checks (no files read: the model folder and its shapes are hpcqwen.preflight's)."""
        return (self._check_layout(spec) + self._check_options(spec)
                + check_report_to("task.report_to", self.report_to, spec))

    def warnings(self, spec: SpecView) -> list[Problem]:
        """Settings that are valid but do nothing (printed on submit, not errors)."""
        from hpcqwen.errors import Problem

        asked = sorted({"eval_interval", "eval_iters"} & self.model_fields_set)
        if asked and not self.val_dataset and self.split_dataset_ratio == 0 and self.eval_iters > 0:
            return [Problem(f"task.{asked[0]}", "evaluation is off: there is nothing to evaluate (no val_dataset, "
                            "split_dataset_ratio 0)", got=str(getattr(self, asked[0])),
                            hint="set split_dataset_ratio or val_dataset, or drop " + " and ".join(asked))]
        return []

    # ---- the checks ----------------------------------------------------------------------------

    def _check_layout(self, spec: SpecView) -> list[Problem]:
        """World size vs TP × PP × CP, EP vs the data-parallel size, the global batch."""
        from hpcqwen.errors import Problem

        p: list[Problem] = []
        nodes, nproc, world = spec.resources.nodes, spec.nproc_per_node, spec.world_size
        tp, pp, cp, ep = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                          self.context_parallel_size, self.expert_model_parallel_size)
        if spec.gpus_per_node == 0:
            p.append(Problem("resources.gpus_per_node", "Megatron training runs on GPUs (NCCL, CUDA kernels) but the "
                             "job asks for none", got="0", expected=">= 1",
                             hint="use a GPU profile, e.g. cluster: h100-8x"))
        if world % (tp * pp * cp):
            sizes = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "context_parallel_size": cp}
            key = next((k for k, v in sizes.items() if v > 1 and world % v), "tensor_model_parallel_size")
            p.append(Problem(f"task.{key}", f"the world size {nodes} node{'s' * (nodes != 1)} × "
                             f"{nproc} GPUs = {world} must be divisible by tensor_model_parallel_size ({tp}) × "
                             f"pipeline_model_parallel_size ({pp}) × context_parallel_size ({cp}) = {tp * pp * cp}",
                             got=str(sizes[key]), expected=f"TP × PP × CP dividing {world}"))
            return p
        dp = world // (tp * pp * cp)
        if (dp * cp) % ep:
            where = f"{dp} = {world} GPUs / (TP {tp} × PP {pp} × CP {cp})"
            if cp > 1:
                where = f"{dp} × context_parallel_size {cp} = {dp * cp}"
            p.append(Problem("task.expert_model_parallel_size", f"must divide the data-parallel size ({where})",
                             got=str(ep), expected=f"a divisor of {dp * cp}"))
        step = self.micro_batch_size * dp
        if self.global_batch_size % step:
            p.append(Problem("task.global_batch_size", f"global_batch_size ({self.global_batch_size}) must be "
                             f"divisible by micro_batch_size ({self.micro_batch_size}) × data-parallel size "
                             f"({dp}) = {step}",
                             got=str(self.global_batch_size), expected=f"a multiple of {step}",
                             hint=f"set global_batch_size: {-(-self.global_batch_size // step) * step}"))
        if self.sequence_parallel and tp == 1:
            p.append(Problem("task.sequence_parallel", "needs tensor_model_parallel_size > 1 (it splits the sequence "
                             "over the tensor-parallel ranks)", got="true", expected="false with TP 1"))
        if ep > 1 and tp > 1 and not self.sequence_parallel:
            p.append(Problem("task.sequence_parallel", f"expert_model_parallel_size ({ep}) with "
                             f"tensor_model_parallel_size ({tp}) needs sequence parallelism (megatron-core: 'When "
                             "using expert parallelism and tensor parallelism for training, sequence parallelism "
                             "must be used')", got="false", expected="true"))
        return p

    def _check_options(self, spec: SpecView) -> list[Problem]:
        from hpcqwen.errors import Problem

        p: list[Problem] = []
        if self.no_save_optim and spec.requeue.enabled:
            p.append(Problem("task.no_save_optim", "checkpoints without the optimizer state cannot resume a requeued "
                             "job (Adam's moments and step would restart from zero)", got="true",
                             hint="set no_save_optim: false, or requeue: {enabled: false}"))
        if self.train_iters is None and self.max_epochs is None:
            p.append(Problem("task.train_iters", "set train_iters (or max_epochs)", expected="e.g. train_iters: 2000"))
        if self.recompute_granularity == "full":
            if self.recompute_method is None:
                p.append(Problem("task.recompute_method", "recompute_granularity full needs a recompute_method",
                                 expected="uniform or block"))
            if self.recompute_num_layers is None:
                p.append(Problem("task.recompute_num_layers", "recompute_granularity full needs recompute_num_layers",
                                 expected="e.g. 1"))
        elif self.recompute_granularity == "selective" and self.recompute_num_layers is not None:
            p.append(Problem("task.recompute_num_layers", "must be unset with recompute_granularity selective",
                             got=str(self.recompute_num_layers)))
        elif self.recompute_granularity is None and (self.recompute_method or self.recompute_num_layers):
            p.append(Problem("task.recompute_granularity", "recompute_method / recompute_num_layers are set but "
                             "recompute_granularity is not", expected="full or selective"))
        cp = self.context_parallel_size
        if self.packing and not self.use_flash_attn:
            p.append(Problem("task.packing", "packing needs use_flash_attn: true (megatron's DotProductAttention "
                             "cannot keep packed sequences apart: it asserts packed_seq_params is None)",
                             got="true", hint="set use_flash_attn: true"))
        if cp > 1 and self.transformer_impl != "transformer_engine":
            p.append(Problem("task.context_parallel_size", f"context_parallel_size ({cp}) needs transformer_impl: "
                             "transformer_engine (megatron: 'Context parallelism is only supported by "
                             "TEDotProductAttention')", got=str(cp), expected="1"))
        if cp > 1 and self.packing:
            p.append(Problem("task.context_parallel_size", "packing with context parallelism is not supported "
                             "(packed sequences would need per-sequence padding to 2 × CP)", got=str(cp),
                             expected="1 with packing"))
        return p


def model_folder(load: Path) -> Path | None:
    """The folder holding config.json and the tokenizer: `load` itself (HF), the `hf/` folder of an
    hpcqwen `iter_<n>` checkpoint, or that of the newest complete one under a checkpoints folder."""
    from hpcqwen.megatron.checkpoint import HF_DIR, latest_complete

    if (load / "config.json").is_file():
        return load
    if (load / HF_DIR / "config.json").is_file():
        return load / HF_DIR
    latest = latest_complete(load)
    return latest / HF_DIR if latest is not None and (latest / HF_DIR / "config.json").is_file() else None
