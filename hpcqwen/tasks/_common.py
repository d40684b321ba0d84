"""Knobs shared by the training and inference tasks: model folders and dataset references.

Paths are resolved on the login node (relative to the spec file, `~` and `${VAR}` expanded) and
frozen into spec.json; a hub id (`Org/Name`) is kept as written, for nodes that are online.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WrapValidator

from hpcqwen import specfile
from hpcqwen.data.formats import subset_error

if TYPE_CHECKING:
    from hpcqwen.spec import Problem

# Data knobs that every task training on conversations shares (sft, grpo, megatron; distill reads prompts).
ChatTemplateMode = Literal["auto", "qwen3", "model"]
CHAT_TEMPLATE_HELP = (
    "Chat template. auto (default): hpcqwen's Qwen3 template when the model ships a known Qwen3 revision (or none), "
    "else the model's own (Qwen3-2507, a fine-tune's); qwen3: always hpcqwen's Qwen3 template; model: always the "
    "model's own. The run log names the one used.")
TruncationStrategy = Literal["delete", "left", "right"]
TRUNCATION_HELP = (
    "Rows longer than max_length: delete (default, as ms-swift) drops them, left cuts their head, right their tail "
    "(the answer then trains without its end-of-turn token). The data summary line in the run log and the cache's "
    "stats.json count the rows it touched.")
MultiTurnMode = Literal["all_rounds", "last_round"]
MULTI_TURN_HELP = (
    "Multi-turn rows. all_rounds (default, ms-swift's default): loss on every assistant turn, each rendered as the "
    "official Qwen3 template renders the newest turn (its own <think> block, empty if none), so later turns see "
    "earlier reasoning that the template drops at inference. last_round (ms-swift's loss_scale last_round): the "
    "chat template's own rendering token for token (earlier reasoning dropped), loss only on the answers after the "
    "last user query; works with any chat template.")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _looks_local(text: str) -> bool:
    return text.startswith(("/", ".", "~", "$")) or not HUB_ID_RE.match(text)


def resolve_model_ref(value: str, base_dir: Path | None) -> str:
    """A local model folder as an absolute path, or a hub id kept as written."""
    if not _looks_local(value):
        local = Path(specfile.expand_path(value, base_dir))
        return str(local) if local.exists() else value
    return specfile.expand_path(value, base_dir)


def split_dataset_ref(ref: str) -> tuple[str, str, str | None]:
    """`path[:subset][#N]` -> (path, subset or '', count text or None). A ':' followed by a
    folder name is part of the path, not a subset separator."""
    head, hash_sign, count = ref.rpartition("#")
    if not hash_sign:
        head = ref
    path, colon, subset = head.rpartition(":")
    if not colon or not subset or "/" in subset:
        path, subset = head, ""
    return path, subset, count if hash_sign else None


def resolve_dataset_ref(ref: str, base_dir: Path | None) -> str:
    """`path[:subset][#N]` with the path made absolute; hub ids and the suffixes kept."""
    path, subset, count = split_dataset_ref(ref)
    resolved = resolve_model_ref(path, base_dir)
    return resolved + (f":{subset}" if subset else "") + (f"#{count}" if count is not None else "")


def _with_context(fn: Any) -> Any:
    def validate(value: Any, handler: Any, info: ValidationInfo) -> Any:
        value = handler(value)
        context = info.context or {}
        if "base_dir" not in context:  # a frozen spec.json: already resolved
            return value
        if isinstance(value, list):
            return [fn(v, context["base_dir"]) for v in value]
        return fn(value, context["base_dir"])
    return validate


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


ModelRef = Annotated[str, WrapValidator(_with_context(resolve_model_ref))]
"""A model folder (or a hub id when the nodes are online)."""
DatasetRefs = Annotated[list[str], BeforeValidator(_listify), WrapValidator(_with_context(resolve_dataset_ref))]
"""One or more `path[:subset][#N]` references (a single string is a one-item list)."""


def is_hub_id(path: str) -> bool:
    """A model or dataset path that is not a local path (kept as written at load)."""
    return not path.startswith("/") and bool(HUB_ID_RE.match(path))


def check_model_dir(key: str, model: str, *, need_tokenizer: bool = True) -> list[Problem]:
    """A local model folder exists, has config.json and (when asked) a tokenizer."""
    from hpcqwen.spec import Problem

    if is_hub_id(model):
        return []
    path = Path(model)
    if not path.is_dir():
        return [Problem(key, "model folder not found", got=model, expected="a local Hugging Face model folder",
                        hint="download it first (huggingface-cli download ORG/NAME --local-dir DIR)")]
    problems = []
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        problems.append(Problem(key, "has no config.json", got=model, expected="a Hugging Face model folder"))
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        problems.append(Problem(key, "model folder has no tokenizer", got=model,
                                expected=f"one of {', '.join(TOKENIZER_FILES)} in the folder",
                                hint="save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))"))
    return problems


def check_datasets(key: str, refs: list[str]) -> list[Problem]:
    """Every local dataset reference names an existing file or folder and a sane `#N`."""
    from hpcqwen.spec import Problem

    problems = []
    for i, ref in enumerate(refs):
        path, _, count = split_dataset_ref(ref)
        if count is not None and (not count.strip().isdigit() or int(count) == 0):
            problems.append(Problem(f"{key}[{i}]", "the sample count after '#' must be a positive integer",
                                    got=repr(ref), expected="name#N, e.g. data.jsonl#500"))
        elif not is_hub_id(path) and not Path(path).exists():
            problems.append(Problem(f"{key}[{i}]", "dataset not found", got=path,
                                    expected="a local .jsonl/.json/.csv/.parquet file or folder, or a hub id"))
        elif (subset := subset_error(ref)) is not None:
            problems.append(Problem(f"{key}[{i}]", subset[0], got=repr(ref), hint=subset[1]))
    return problems


class ModelKnobs(BaseModel):
    """The model and LoRA knobs that the transformers-based training tasks (sft, grpo) share."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelRef = Field(description="Local Hugging Face model folder (or hub id when the nodes are online).")
    train_type: Literal["lora", "full"] = Field("lora", description="LoRA adapters or all parameters.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Literal["all-linear"] | list[str] = Field("all-linear", description="LoRA target modules.")
    torch_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    chat_template: ChatTemplateMode = Field("auto", description=CHAT_TEMPLATE_HELP)
