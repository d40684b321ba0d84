"""`hpcqwen export RUN_DIR|CHECKPOINT [--merge-lora | --to-hf] [--output DIR] [--push-to-hub ID]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcqwen import export
from hpcqwen.errors import HpcqwenError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET and the export options."""
    p.add_argument("target", help="run dir (its newest complete checkpoint), a checkpoint-<step> or an iter_<n> folder")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    p.add_argument("--to-hf", action="store_true",
                   help="convert a Megatron run's dist checkpoint (iter_<n>) to Hugging Face safetensors")
    p.add_argument("--output", help="output folder (default: <task dir>/exports/<checkpoint>-merged, or "
                   "<checkpoint>-hf with --to-hf)")
    p.add_argument("--task", type=int, default=None, help="array task index of a run dir")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result; the token comes from HF_TOKEN")


def run(args: argparse.Namespace) -> int:
    """Export (and push)."""
    target = Path(args.target).resolve()
    megatron = export.resolve_megatron_checkpoint(target, args.task)
    if megatron is not None and not args.to_hf:
        raise HpcqwenError(f"{megatron} is a Megatron checkpoint", hint="add --to-hf to convert it")
    if megatron is None and args.to_hf:
        raise HpcqwenError(f"{target} is not a Megatron run dir or iter_<n> checkpoint",
                           hint="--to-hf is for task.kind megatron; SFT checkpoints are HF already")
    ckpt = megatron or export.resolve_checkpoint(target, args.task)
    suffix = "hf" if megatron else "merged"
    out = Path(args.output).resolve() if args.output else ckpt.parent.parent / "exports" / f"{ckpt.name}-{suffix}"
    if megatron:
        export.export_megatron(megatron, out)
    else:
        export.export_checkpoint(ckpt, out, merge_lora=args.merge_lora)
    print(f"exported {ckpt} -> {out}")
    if args.push_to_hub:
        print(f"pushed: {export.push_to_hub(out, args.push_to_hub)}")
    return 0
