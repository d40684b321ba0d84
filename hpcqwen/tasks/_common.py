"""Knobs shared by the training and inference tasks: model folders and dataset references.

A reference is a local path or a hub id. It is local when it looks like a file (a dataset with a
data-file extension such as `.jsonl`; anything starting with `/ . ~ $`), is not shaped like a hub
id (`Org/Name`), or exists on this machine; local paths are resolved on the login node (relative
to the spec file, `~` and `${VAR}` expanded), frozen into spec.json, and must exist (`check_*`,
on render and submit). A hub id is kept as written; when the hub is off (HF_HUB_OFFLINE) it must
already be in the local Hugging Face cache, since the nodes could not download it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationInfo, WrapValidator

from hpcqwen import specfile
from hpcqwen.data.formats import split_dataset_ref, subset_error
from hpcqwen.fields import MAX_BATCH, MAX_FACTOR, MAX_LORA, MAX_LR, SPEC_CONFIG
from hpcqwen.modelfiles import TOKENIZER_MARKERS

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView

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
# The hub's repo id: one '/', each part 1-96 of letters, digits, '-', '_', '.' (no '--' or '..').
HUB_ID_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}\Z", re.ASCII)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow", ".gz", ".zst")
# The variables that turn the hub off for what loads each kind of repo (huggingface_hub, transformers, datasets).
OFFLINE_VARS = {"model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}


def _looks_local(text: str, suffixes: tuple[str, ...] = ()) -> bool:
    return (text.startswith(("/", ".", "~", "$")) or text.lower().endswith(suffixes)
            or not HUB_ID_RE.match(text))


def _resolve_ref(value: str, base_dir: Path | None, suffixes: tuple[str, ...]) -> str:
    if not _looks_local(value, suffixes):
        local = Path(specfile.expand_path(value, base_dir))
        return str(local) if local.exists() else value
    return specfile.expand_path(value, base_dir)


def resolve_model_ref(value: str, base_dir: Path | None) -> str:
    """A local model folder as an absolute path, or a hub id kept as written."""
    return _resolve_ref(value, base_dir, ())


def resolve_dataset_ref(ref: str, base_dir: Path | None) -> str:
    """`path[:subset][#N]` with the path made absolute; hub ids and the suffixes kept."""
    path, subset, count = split_dataset_ref(ref)
    resolved = _resolve_ref(path, base_dir, DATA_SUFFIXES)
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


def hub_offline(repo_type: Literal["model", "dataset"]) -> str | None:
    """The variable that turns the Hugging Face hub off for this kind of repo here (Slurm exports it to the
    nodes), if one is set."""
    on = ("1", "true", "yes", "on")
    return next((v for v in OFFLINE_VARS[repo_type] if os.environ.get(v, "").lower() in on), None)


def in_hf_cache(repo_id: str, repo_type: Literal["model", "dataset"]) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of the repo (the hub cache, or for
    datasets also the `datasets` library's cache)."""
    home = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub").expanduser()
    snapshots = hub / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":
        cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
        name = repo_id.replace("/", "___")
        return (cache / name).is_dir() or (cache / name.lower()).is_dir()
    return False


def check_hub_ref(key: str, repo_id: str, repo_type: Literal["model", "dataset"]) -> list[Problem]:
    """A hub id works offline only when the local cache already holds it."""
    from hpcqwen.errors import Problem

    off = hub_offline(repo_type)
    if off is None or in_hf_cache(repo_id, repo_type):
        return []
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return [Problem(key, f"is a hub id that is not in the local Hugging Face cache, and {off}=1 turns the hub off: "
                    "the nodes cannot download it", got=repo_id,
                    expected="a local path (starting with ./ or /, or existing), or a hub id in the cache",
                    hint=f"download it first (huggingface-cli download{flag} {repo_id}, with HF_HOME on the shared "
                    "filesystem), or unset " + off)]


def check_model_dir(key: str, model: str, *, need_tokenizer: bool = True) -> list[Problem]:
    """A local model folder exists, has config.json and (when asked) a tokenizer; a hub id is usable."""
    from hpcqwen.errors import Problem

    if is_hub_id(model):
        return check_hub_ref(key, model, "model")
    path = Path(model)
    if not path.is_dir():
        return [Problem(key, "model folder not found", got=model, expected="a local Hugging Face model folder",
                        hint="download it first (huggingface-cli download ORG/NAME --local-dir DIR)")]
    problems = []
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        problems.append(Problem(key, "has no config.json", got=model, expected="a Hugging Face model folder"))
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_MARKERS):
        problems.append(Problem(key, "model folder has no tokenizer", got=model,
                                expected=f"one of {', '.join(TOKENIZER_MARKERS)} in the folder",
                                hint="save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))"))
    return problems


def check_datasets(key: str, refs: list[str]) -> list[Problem]:
    """Every local dataset reference names an existing file or folder and a sane `#N`."""
    from hpcqwen.errors import Problem

    problems = []
    for i, ref in enumerate(refs):
        path, _, count = split_dataset_ref(ref)
        if count is not None and not is_sample_count(count):
            problems.append(Problem(f"{key}[{i}]", "the sample count after '#' must be a positive integer",
                                    got=repr(ref), expected="name#N, e.g. data.jsonl#500"))
        elif (subset := subset_error(ref)) is not None:  # a subset the dataset does not have (hub id or copy)
            problems.append(Problem(f"{key}[{i}]", subset[0], got=repr(ref), hint=subset[1]))
        elif is_hub_id(path):
            problems += check_hub_ref(f"{key}[{i}]", path, "dataset")
        elif not Path(path).exists():
            problems.append(Problem(f"{key}[{i}]", "dataset not found", got=path,
                                    expected="a local .jsonl/.json/.csv/.parquet file or folder, or a hub id",
                                    hint="a path with a data-file extension is a local file: check its spelling"))
    return problems


MAX_CHECK_ENTRIES = 10_000  # a dataset folder is walked at most this far by the login-node checks


def dataset_files(path: Path, limit: int = MAX_CHECK_ENTRIES) -> list[Path] | None:
    """The files a local dataset reference holds (the file itself, or a folder's files, sorted), or None
    when the folder has more than `limit` entries: a check on the login node must not walk a whole home
    folder named by mistake (the node's loader reports such data instead). Symlinked folders are not followed."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files, seen = [], 0
    for root, dirs, names in os.walk(path):
        seen += len(dirs) + len(names)
        if seen > limit:
            return None
        files += [Path(root) / n for n in names]
    return sorted(files)


def is_sample_count(text: str) -> bool:
    """`N` of `name#N`: a positive whole number of at most 9 digits."""
    return re.fullmatch(r"[0-9]{1,9}", text.strip()) is not None and int(text) > 0


REPORT_TO_HELP = (
    "Experiment trackers, as HF/ms-swift's report_to: tensorboard (default), wandb, mlflow, a list of them, or "
    "none. Offline by default, under the task dir: tensorboard/, wandb/ (WANDB_MODE=offline unless set; `wandb "
    "sync` later), mlruns/ (a file store unless MLFLOW_TRACKING_URI is set); run name = the spec's name, job id "
    "as a tag. Keys (WANDB_API_KEY) come from the submitting shell, never from the spec.")


Tracker = Literal["tensorboard", "wandb", "mlflow", "none"]


def default_report_to() -> list[Tracker]:
    """tensorboard, as before report_to existed (and as transformers' default when it is installed)."""
    return ["tensorboard"]


def _one_tracker_each(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("needs at least one entry (none turns tracking off)")
    if "none" in value and len(value) > 1:
        raise ValueError("'none' turns tracking off: it cannot be combined with a tracker")
    if len(set(value)) != len(value):
        raise ValueError("names a tracker twice")
    return value


ReportTo = Annotated[list[Tracker], BeforeValidator(_listify),
                     AfterValidator(_one_tracker_each)]
"""`report_to`: one tracker or a list (a single string is a one-item list)."""


def check_report_to(key: str, report_to: Sequence[str], spec: SpecView) -> list[Problem]:
    """wandb and mlflow are installed where the nodes run this interpreter (no profile python, no container:
    elsewhere the site's environment decides)."""
    import importlib.util

    from hpcqwen.errors import Problem

    if spec.cluster.python is not None or spec.cluster.container is not None:
        return []
    return [Problem(key, f"{name} is not installed in this Python ({sys.executable}), which the nodes run",
                    got=name, hint="pip install 'hpcqwen[tracking]' (wandb, mlflow-skinny)")
            for name in report_to if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None]


ZERO_PRESETS = ("zero2", "zero3", "zero3_offload")
DEEPSPEED_HELP = ("zero2, zero3 or zero3_offload (hpcqwen's presets), or a DeepSpeed JSON config file of any name "
                  "(relative to the spec's folder); the file is copied into the run dir at submit.")
MAX_DEEPSPEED_BYTES = 1 << 20


def resolve_deepspeed_ref(value: str | None, base_dir: Path | None) -> str | None:
    """A preset name as written, any other value a file path made absolute (relative to the spec's folder).

    Raises:
        ValueError: a preset name that is also a file in the spec's folder (say which one is meant).
    """
    if value is None:
        return None
    if value in ZERO_PRESETS:
        twin = Path(base_dir or ".") / value
        if twin.is_file():
            raise ValueError(f"names both the preset {value} and the file {twin}: write ./{value} for the file, "
                             "or rename the file")
        return value
    return specfile.expand_path(value, base_dir)


DeepSpeedRef = Annotated[str | None, WrapValidator(_with_context(resolve_deepspeed_ref))]
"""A ZeRO preset or a DeepSpeed config file (absolute after load)."""


def check_deepspeed(key: str, value: str | None) -> list[Problem]:
    """A preset, or an existing file holding a JSON object (whatever its name: a file is never taken for a preset)."""
    from hpcqwen.errors import Problem

    if value is None or value in ZERO_PRESETS:
        return []
    path = Path(value)
    expected = f"one of {', '.join(ZERO_PRESETS)} or a DeepSpeed JSON config file"
    if not path.is_file():
        return [Problem(key, f"is neither a preset ({', '.join(ZERO_PRESETS)}) nor an existing file", got=value,
                        expected=expected, hint="a relative path is relative to the spec's folder")]
    try:
        with path.open("rb") as f:
            data = json.loads(f.read(MAX_DEEPSPEED_BYTES + 1))
    except (OSError, ValueError) as e:
        return [Problem(key, f"is not a readable JSON file: {str(e)[:200]}", got=value, expected=expected)]
    if not isinstance(data, dict):
        return [Problem(key, "is not a JSON object (a DeepSpeed config is a mapping of settings)", got=value,
                        expected=expected)]
    return []


class BuiltinRunner:
    """A task kind run by hpcqwen's own runner `hpcqwen.runners.<kind>`, which reads everything from the
    run dir (the `command` kind names its own module and arguments instead)."""

    kind: str

    def runner_module(self) -> str:
        """The module the launcher starts on every process."""
        return f"hpcqwen.runners.{self.kind}"

    def runner_args(self, run_dir: str) -> list[str]:
        """The runner reads everything from the run dir."""
        return [run_dir]


class ModelKnobs(BaseModel):
    """The model, LoRA and optimizer knobs that the transformers-based training tasks (sft, grpo) share."""

    model_config = SPEC_CONFIG
    model: ModelRef = Field(description="Local Hugging Face model folder (or hub id when the nodes are online).")
    train_type: Literal["lora", "full"] = Field("lora", description="LoRA adapters or all parameters.")
    lora_rank: int = Field(8, ge=1, le=MAX_LORA, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, le=MAX_LORA, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Literal["all-linear"] | list[str] = Field("all-linear", description="LoRA target modules.")
    torch_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    chat_template: ChatTemplateMode = Field("auto", description=CHAT_TEMPLATE_HELP)
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH, description="Micro batches per optimizer step.")
    learning_rate: float | None = Field(None, gt=0, le=MAX_LR,
                                        description="Peak LR; default 1e-4 for LoRA, 1e-5 for full.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up fraction of the steps.")
    weight_decay: float = Field(0.1, ge=0, le=MAX_FACTOR, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, le=MAX_FACTOR, description="Gradient clipping norm.")

    @property
    def lr(self) -> float:
        """learning_rate, or ms-swift's default for the train type."""
        return self.learning_rate or (1e-4 if self.train_type == "lora" else 1e-5)
