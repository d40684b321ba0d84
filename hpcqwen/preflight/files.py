"""Preflight checks that read files on this machine or import code: the task's model, data, plugins, engine.

Moved here from the task models (`tasks/*.py` `check` stays pure: types, ranges, cross-field rules),
so `hpcqwen render` works without the model on disk and `hpcqwen check` / `submit` say what is
missing, with the same messages as before. Reads stay bounded (`tasks.scan`, `CHECK_ROWS_LIMIT`):
this runs on a shared login node. A value that is a pipeline reference (`${stages...}`) names a file
an earlier stage will write; it is not looked for.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcqwen import specfile
from hpcqwen.data.formats import split_dataset_ref
from hpcqwen.errors import Problem
from hpcqwen.modelfiles import TOKENIZER_MARKERS
from hpcqwen.spec import JobSpec
from hpcqwen.stagerefs import is_stage_ref
from hpcqwen.tasks import CommandTask, DistillTask, GrpoTask, MegatronTask, SftTask
from hpcqwen.tasks._common import (
    check_datasets,
    check_deepspeed,
    check_hub_ref,
    check_model_dir,
    dataset_files,
    is_hub_id,
)


def file_problems(spec: JobSpec) -> list[Problem]:
    """Problems of the task's files, and of each array task's where its overrides change them."""
    return _every_task(spec, lambda task: _guarded(CHECKS.get(type(task)), task, spec))


def input_problems(spec: JobSpec) -> list[Problem]:
    """Problems of the inputs submit copies into the run dir (reward plugins, DeepSpeed configs), checked
    without running them: what `hpcqwen render` checks too (it needs no data or model on disk)."""
    return _every_task(spec, lambda task: _guarded(_inputs, task, spec))


def _inputs(task: Any, spec: JobSpec) -> list[Problem]:
    p = _deepspeed(task.deepspeed) if isinstance(task, (SftTask, GrpoTask)) else []
    return p + (_rewards(task) if isinstance(task, GrpoTask) else [])


def _every_task(spec: JobSpec, check: Callable[[Any], list[Problem]]) -> list[Problem]:
    problems = check(spec.task)
    seen = {(p.message, p.got) for p in problems}
    for i in range(spec.array.count if spec.array and spec.array.tasks else 0):
        for p in check(spec.task_for(i)):
            if (p.message, p.got) not in seen:
                seen.add((p.message, p.got))
                key = f"array.tasks[{i}]." + p.key.removeprefix("task.")
                problems.append(Problem(key, p.message, p.got, p.expected, p.hint))
    return problems


def _guarded(check: Callable[[Any, JobSpec], list[Problem]] | None, task: Any, spec: JobSpec) -> list[Problem]:
    if check is None:
        return []
    try:
        return check(task, spec)
    except OSError as e:  # e.g. a path the filesystem refuses; the check could not finish
        return [Problem("task", f"could not check the task's files: {e.strerror or e}",
                        got=specfile._short(e.filename or ""), hint="check the paths in task:")]


def _model(key: str, model: str, **kw: bool) -> list[Problem]:
    return [] if is_stage_ref(model) else check_model_dir(key, model, **kw)


def _datasets(key: str, refs: list[str]) -> list[Problem]:
    return check_datasets(key, [r for r in refs if not is_stage_ref(r)])


def _deepspeed(value: str | None) -> list[Problem]:
    return check_deepspeed("task.deepspeed", value)


# ---- sft ----------------------------------------------------------------------------------------

def sft_files(task: SftTask, spec: JobSpec) -> list[Problem]:
    """Model folder, datasets, a DeepSpeed file, `{{NAME}}` placeholders without model_name."""
    from hpcqwen.data.formats import PLACEHOLDERS
    from hpcqwen.tasks.scan import contains_any

    p = _model("task.model", task.model) + _datasets("task.dataset", task.dataset)
    p += _datasets("task.val_dataset", task.val_dataset) + _deepspeed(task.deepspeed)
    if (task.model_name is None or task.model_author is None) and contains_any(task.dataset, PLACEHOLDERS):
        p.append(Problem("task.model_name", "the data has {{NAME}}/{{AUTHOR}} placeholders but model_name or "
                         "model_author is missing", hint="set model_name: [中文名, English name] and model_author"))
    return p


# ---- grpo ---------------------------------------------------------------------------------------

def grpo_files(task: GrpoTask, spec: JobSpec) -> list[Problem]:
    """Model folder, datasets, DeepSpeed file, and every reward plugin checked without running it (the file,
    its syntax, the function's parameters: `hpcqwen.rewards.static`; submit imports the run dir's copy)."""
    return (_model("task.model", task.model) + _datasets("task.dataset", task.dataset) + _rewards(task)
            + _deepspeed(task.deepspeed))


def _rewards(task: GrpoTask) -> list[Problem]:
    from hpcqwen.data.formats import CONSUMED_COLUMNS
    from hpcqwen.rewards.builtin import required_columns
    from hpcqwen.rewards.static import check_reward_ref
    from hpcqwen.tasks.grpo import dataset_columns

    p: list[Problem] = []
    columns = dataset_columns(task.dataset)
    for i, ref in enumerate(task.reward_funcs):
        problems = check_reward_ref(ref, "/", None if columns is None else columns - set(CONSUMED_COLUMNS))
        if problems:
            p.append(Problem(f"task.reward_funcs[{i}]", f"{ref}: " + "; ".join(problems),
                             hint="see jobspecs/plugins/example_reward.py"))
        missing = sorted(required_columns(ref) - columns) if columns is not None else []
        p += [Problem("task.dataset", f"has no {col!r} column, which reward {ref!r} needs",
                      got=f"columns {', '.join(sorted(columns or ()))}",
                      hint=f"add a {col!r} column with the reference answer to every row") for col in missing]
    return p


# ---- distill ------------------------------------------------------------------------------------

def distill_files(task: DistillTask, spec: JobSpec) -> list[Problem]:
    """Model, adapters, prompt rows, the model's context length, and the inference engine."""
    from hpcqwen.tasks.distill import model_max_len

    p = _model("task.model", task.model)
    if task.adapters is not None and is_stage_ref(task.adapters):
        pass
    elif task.adapters is not None and is_hub_id(task.adapters):
        p += check_hub_ref("task.adapters", task.adapters, "model")
    elif task.adapters is not None and not (Path(task.adapters) / "adapter_config.json").is_file():
        p.append(Problem("task.adapters", "has no adapter_config.json", got=task.adapters,
                         expected="a LoRA checkpoint folder (checkpoints/checkpoint-N of an SFT run)"))
    data_problems = _datasets("task.dataset", task.dataset)
    p += data_problems or _distill_rows(task)
    longest = None if is_stage_ref(task.model) else model_max_len(task.model)
    if longest is not None and task.max_model_len > longest:
        p.append(Problem("task.max_model_len", f"max_model_len ({task.max_model_len}) is longer than the model's "
                         f"max_position_embeddings ({longest})", got=str(task.max_model_len),
                         expected=f"<= {longest}"))
    return p + _distill_engine(task, spec)


def _distill_rows(task: DistillTask) -> list[Problem]:
    """Read local prompts now (login node), so a bad column or an empty file fails before sbatch."""
    from hpcqwen.data.formats import DataError, load_dataset_rows
    from hpcqwen.tasks.distill import CHECK_ROWS_LIMIT, prompt_messages

    if any(is_stage_ref(r) for r in task.dataset):
        return []  # an earlier stage writes (some of) the prompts
    local = [r for r in task.dataset if not is_hub_id(split_dataset_ref(r)[0])]
    size = sum(_size(Path(split_dataset_ref(r)[0])) for r in local)
    if not local or size > CHECK_ROWS_LIMIT:
        return []  # hub ids and huge sets: the runner reports row errors
    try:
        rows = load_dataset_rows(local, base_dir="/", seed=task.seed, system=task.system)
    except DataError as e:
        return [Problem("task.dataset", e.message, got=e.where, expected="rows with `messages` or `query`",
                        hint=e.hint)]
    for i, row in enumerate(rows):
        if not any(m["role"] != "system" for m in prompt_messages(row["messages"])):
            return [Problem("task.dataset", f"prompt {i} has no user turn once the final assistant turn is "
                            "dropped", got=json.dumps(row["messages"])[:120])]
    if len(local) == len(task.dataset) and task.shards > len(rows):
        return [Problem("task.shards", f"{task.shards} shards for {len(rows)} prompts leaves shards empty",
                        got=str(task.shards), expected=f"<= {len(rows)}")]
    return []


def _distill_engine(task: DistillTask, spec: JobSpec) -> list[Problem]:
    """vLLM is findable, and on CPU the model's head size is one vLLM's CPU attention supports."""
    from hpcqwen.tasks.distill import VLLM_CPU_HEAD_DIMS

    if task.infer_backend == "hf":
        return []
    p = []
    python = task.vllm_python
    same_python = spec.cluster.python is None and spec.cluster.container is None
    if task.infer_backend == "vllm" and same_python and not has_vllm(python):
        p.append(Problem("task.infer_backend", "vLLM is not installed for the nodes' interpreter",
                         got=python or sys.executable, expected="an interpreter where `import vllm` works",
                         hint="run scripts/setup-vllm.sh (or set HPCQWEN_VLLM_PYTHON), or infer_backend: hf"))
    if spec.gpus_per_node == 0 and (task.infer_backend == "vllm" or has_vllm(python)):
        head_dim = None if is_stage_ref(task.model) else _head_dim(task.model)
        if head_dim is not None and head_dim not in VLLM_CPU_HEAD_DIMS:
            p.append(Problem("task.model", f"vLLM's CPU attention does not support head_dim {head_dim}",
                             got=str(head_dim), expected=f"one of {list(VLLM_CPU_HEAD_DIMS)}",
                             hint="use infer_backend: hf on CPU, or a model with head_dim >= 32"))
    return p


def _size(path: Path) -> int:
    from hpcqwen.tasks.distill import CHECK_ROWS_LIMIT

    files = dataset_files(path)
    if files is None:  # too many files to look at here: as good as too large
        return CHECK_ROWS_LIMIT + 1
    return sum(f.stat().st_size for f in files if f.is_file())


def has_vllm(python: str | None) -> bool:
    """vLLM findable in `python` (a file check for another interpreter's venv) or in this one."""
    if python and python != sys.executable:
        if not Path(python).is_file():
            return False
        venv = Path(python).parent.parent
        return any(venv.glob("lib/python3*/site-packages/vllm/__init__.py"))
    return importlib.util.find_spec("vllm") is not None


def _head_dim(model: str) -> int | None:
    from hpcqwen.tasks.distill import model_config

    c = model_config(model)
    if not c:
        return None
    if c.get("head_dim"):
        return int(c["head_dim"])
    heads = c.get("num_attention_heads")
    return int(c["hidden_size"]) // int(heads) if heads and c.get("hidden_size") else None


# ---- megatron -----------------------------------------------------------------------------------

def megatron_files(task: MegatronTask, spec: JobSpec) -> list[Problem]:
    """Datasets, the `load` folder, and the parallel sizes against the model's own numbers."""
    p = _datasets("task.dataset", task.dataset) + _datasets("task.val_dataset", task.val_dataset)
    if is_stage_ref(task.load):
        return p
    config, problems = _megatron_config(task.load)
    return p + problems + (_megatron_shapes(task, config) if config is not None else [])


def _megatron_config(load: str) -> tuple[tuple[dict[str, Any], str] | None, list[Problem]]:
    """(config.json of `load`, its path) when `load` is local, and problems with the folder."""
    from hpcqwen.megatron.dims import read_config
    from hpcqwen.tasks.megatron import model_folder

    if is_hub_id(load):
        return None, check_hub_ref("task.load", load, "model")
    folder = model_folder(Path(load))
    if folder is None:
        return None, [Problem("task.load", "is neither a Hugging Face model folder nor an hpcqwen megatron "
                              "checkpoint", got=load, expected="a folder with config.json, or checkpoints "
                              "with a complete iter_<n>/", hint="download the model first (huggingface-cli "
                              "download ORG/NAME --local-dir DIR)")]
    p = []
    if not any((folder / f).is_file() for f in TOKENIZER_MARKERS):
        p.append(Problem("task.load", "model folder has no tokenizer", got=str(folder),
                         expected=f"one of {', '.join(TOKENIZER_MARKERS)} in the folder"))
    try:
        return (read_config(folder), str(folder / "config.json")), p
    except (OSError, ValueError) as e:
        return None, [*p, Problem("task.load", f"config.json is unreadable: {e}", got=str(folder))]


def _megatron_shapes(task: MegatronTask, found: tuple[dict[str, Any], str]) -> list[Problem]:
    """Parallel sizes against the model's experts, heads and layers."""
    from hpcqwen.megatron.dims import UnsupportedModel, dims_from_config

    config, path = found
    try:
        d = dims_from_config(config)
    except (UnsupportedModel, KeyError) as e:
        return [Problem("task.load", f"{path}: {e}", expected="a Qwen3 or Qwen3-MoE model")]
    p: list[Problem] = []
    tp, pp, ep = task.tensor_model_parallel_size, task.pipeline_model_parallel_size, task.expert_model_parallel_size
    if ep > 1 and not d.is_moe:
        p.append(Problem("task.expert_model_parallel_size", f"is {ep} but the model is dense (model_type "
                         f"{d.model_type} in {path})", got=str(ep), expected="1"))
    elif d.is_moe and d.num_experts % ep:
        p.append(Problem("task.expert_model_parallel_size", f"must divide the model's expert count "
                         f"({d.num_experts}, num_experts in {path})", got=str(ep),
                         expected=f"a divisor of {d.num_experts}"))
    if d.num_heads % tp or d.num_kv_heads % tp:
        p.append(Problem("task.tensor_model_parallel_size", f"must divide the model's attention heads "
                         f"({d.num_heads}) and key/value heads ({d.num_kv_heads})", got=str(tp),
                         expected=f"a divisor of {d.num_kv_heads}"))
    ffn = d.moe_ffn_hidden_size if d.is_moe else d.ffn_hidden_size
    if ffn % tp:
        p.append(Problem("task.tensor_model_parallel_size", f"must divide the model's MLP width ({ffn})",
                         got=str(tp)))
    if d.num_layers % pp:
        p.append(Problem("task.pipeline_model_parallel_size", f"must divide the model's {d.num_layers} layers",
                         got=str(pp), expected=f"a divisor of {d.num_layers}"))
    elif task.recompute_num_layers and task.recompute_num_layers > d.num_layers // pp:
        p.append(Problem("task.recompute_num_layers", f"is more than the {d.num_layers // pp} layers of a "
                         "pipeline stage", got=str(task.recompute_num_layers),
                         expected=f"1..{d.num_layers // pp}"))
    return p


def _no_files(task: CommandTask, spec: JobSpec) -> list[Problem]:
    return []


CHECKS: dict[type, Callable[[Any, JobSpec], list[Problem]]] = {
    SftTask: sft_files, GrpoTask: grpo_files, DistillTask: distill_files, MegatronTask: megatron_files,
    CommandTask: _no_files}
