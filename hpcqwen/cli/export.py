"""`hpcqwen export RUN_DIR|CHECKPOINT [--merge-lora] [--output DIR] [--push-to-hub ID]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcqwen import export


def add_arguments(p: argparse.ArgumentParser) -> None:
    """TARGET and the export options."""
    p.add_argument("target", help="run dir (its newest complete checkpoint) or a checkpoint-<step> folder")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    p.add_argument("--output", help="output folder (default: <task dir>/exports/<checkpoint>-merged)")
    p.add_argument("--task", type=int, default=None, help="array task index of a run dir")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result; the token comes from HF_TOKEN")


def run(args: argparse.Namespace) -> int:
    """Export (and push)."""
    ckpt = export.resolve_checkpoint(Path(args.target).resolve(), args.task)
    out = Path(args.output).resolve() if args.output else ckpt.parent.parent / "exports" / f"{ckpt.name}-merged"
    export.export_checkpoint(ckpt, out, merge_lora=args.merge_lora)
    print(f"exported {ckpt} -> {out}")
    if args.push_to_hub:
        print(f"pushed: {export.push_to_hub(out, args.push_to_hub)}")
    return 0
