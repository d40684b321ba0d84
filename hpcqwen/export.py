"""Export a training checkpoint as a plain Hugging Face model (LoRA merged), optionally pushed.

Megatron runs (`task.kind: megatron`) keep `dist_checkpointing` folders `iter_<n>/`; `--to-hf`
converts one back to Hugging Face safetensors on this machine's CPU (hpcqwen.megatron.checkpoint).

The hub token is read from the environment (HF_TOKEN / HUGGING_FACE_HUB_TOKEN) at push time and
handed to huggingface_hub in memory only: never written to the output folder, logs or run dir.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpcqwen import checkpoints
from hpcqwen.errors import HpcqwenError, RunDirError
from hpcqwen.paths import SPEC_JSON, RunPaths, is_run_dir

TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def resolve_checkpoint(target: Path, array_index: int | None = None) -> Path:
    """A run dir -> its newest complete checkpoint; a checkpoint folder -> itself (if complete)."""
    if is_run_dir(target):
        root = RunPaths(target).task(array_index).checkpoints
        latest = checkpoints.latest_complete(root)
        if latest is None:
            raise RunDirError(f"{target} has no complete checkpoint yet", where=str(root),
                              hint="wait for the first save (save_steps), or give a checkpoint folder")
        return latest
    if checkpoints.step_of(target) is not None:
        if not checkpoints.is_complete(target):
            raise RunDirError(f"{target} is not a complete checkpoint (no {checkpoints.MARKER})",
                              hint="the save was interrupted; use an older checkpoint")
        return target
    raise RunDirError(f"{target} is neither a run dir nor a checkpoint-<step> folder",
                      hint="give the run dir that `hpcqwen submit` printed")


def megatron_checkpoint_root(run_dir: Path, array_index: int | None = None) -> Path | None:
    """The checkpoint folder of a Megatron run dir (`task.save` or `<task dir>/checkpoints`), else None."""
    task = json.loads((run_dir / SPEC_JSON).read_text())["task"]
    if task.get("kind") != "megatron":
        return None
    return Path(task["save"]) if task.get("save") else RunPaths(run_dir).task(array_index).checkpoints


def resolve_megatron_checkpoint(target: Path, array_index: int | None = None) -> Path | None:
    """A Megatron run dir -> its newest complete `iter_<n>`; an `iter_<n>` folder -> itself (if
    complete); None when `target` is neither (an SFT run or checkpoint)."""
    from hpcqwen.megatron import checkpoint as mcore

    if is_run_dir(target):
        root = megatron_checkpoint_root(target, array_index)
        if root is None:
            return None
        latest = mcore.latest_complete(root)
        if latest is None:
            raise RunDirError(f"{target} has no complete Megatron checkpoint yet", where=str(root),
                              hint="wait for the first save (save_interval), or give an iter_<n> folder")
        return latest
    if mcore.iteration_of(target) is None:
        return None
    if not checkpoints.is_complete(target):
        raise RunDirError(f"{target} is not a complete checkpoint (no {checkpoints.MARKER})",
                          hint="the save was interrupted; use an older iter_<n>")
    return target


def export_megatron(ckpt: Path, out: Path) -> Path:
    """Write a Hugging Face model folder (safetensors, config, tokenizer) from a Megatron `iter_<n>`."""
    from hpcqwen.megatron.checkpoint import export_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    return export_hf(ckpt, out)


def base_model_of(ckpt: Path) -> str:
    """The base model of a LoRA checkpoint: the run's spec.json, else adapter_config.json."""
    for parent in ckpt.parents:
        if (parent / SPEC_JSON).is_file():
            task = json.loads((parent / SPEC_JSON).read_text())["task"]
            if "model" in task:
                return str(task["model"])
            break
    return str(json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"])


def model_dtype(model: str) -> str:
    """The dtype a model folder (or hub id) declares in its config (`dtype`, formerly `torch_dtype`),
    as a torch name; float32 when it declares none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def merged_model(ckpt: Path) -> Any:
    """The base model with `ckpt`'s adapters merged, in the base model's own dtype.

    The merge runs in float32 (a bfloat16 `W + BA` would round the small update away in part); the
    result is cast back to the base's dtype, so the export is the base's size and vLLM's
    `dtype=auto` serves it as the base is served (a float32 config would be served as float16).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = base_model_of(ckpt)
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    return merged.to(getattr(torch, model_dtype(base_ref)))


def export_checkpoint(ckpt: Path, out: Path, merge_lora: bool = True) -> Path:
    """Write a loadable HF model folder (weights + tokenizer) for `ckpt` into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_lora = (ckpt / "adapter_config.json").is_file()
    if is_lora and not merge_lora:
        raise HpcqwenError(f"{ckpt} holds LoRA adapters only", hint="add --merge-lora to write a full model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A full checkpoint keeps its own dtype ("auto"), as a merged one keeps its base's.
    model = merged_model(ckpt) if is_lora else AutoModelForCausalLM.from_pretrained(str(ckpt), dtype="auto")
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload `folder` to the hub with the token from the environment; returns the commit URL."""
    token = next((os.environ[v] for v in TOKEN_VARS if os.environ.get(v)), None)
    if token is None:
        raise HpcqwenError("no hub token in the environment", hint="export HF_TOKEN=... (it is never written to disk)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:  # network or auth: report without the token (huggingface_hub never prints it)
        message = str(e).replace(token, "***")
        raise HpcqwenError(f"push to {repo_id} failed: {type(e).__name__}: {message.splitlines()[0]}",
                           hint="check the network, the repo id and the token's write access") from None
    return str(getattr(info, "commit_url", info))
