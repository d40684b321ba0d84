"""`hpcqwen` command line: one module per subcommand; errors become exit codes here only."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from hpcqwen import __version__
from hpcqwen.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, HpcqwenError, clip

# subcommand -> module in hpcqwen.cli (each has add_arguments(parser) and run(args) -> int)
SUBCOMMANDS = {
    "render": ("render", "print the sbatch script of a spec; nothing is written or submitted"),
    "submit": ("submit", "validate a spec, make its run dir and submit it"),
    "status": ("status", "state of a job or run dir (squeue, then sacct)"),
    "logs": ("logs", "print (or follow with -f) the log of a job or run dir"),
    "cancel": ("cancel", "cancel a job or the job of a run dir (its ranks save first)"),
    "resume": ("resume", "submit an existing run dir again: its unfinished tasks continue from their checkpoints"),
    "queue": ("queue", "live view of hpcqwen runs: states, pending reasons, training progress"),
    "hangs": ("hangs", "list the hang reports of a run (stacks of every rank, the suspect node, the action)"),
    "plot": ("plot", "write loss / lr / tokens/s (and reward) curves of a run dir as a PNG"),
    "prepare": ("prepare", "build the tokenization/packing cache of a training spec as its own CPU job"),
    "export": ("export", "write a checkpoint as a Hugging Face model (--merge-lora), optionally push it"),
    "merge": ("merge", "write a distill run's result_path from its shards (--resubmit unfinished shards)"),
    "pipeline": ("pipeline", "submit a pipeline of stages at once (with dependencies); status, cancel, resume it"),
    "check": ("check", "will a spec or pipeline start, fit and finish? every preflight check, with numbers"),
    "cost": ("cost", "GPU-hours of a run or pipeline: allocated, start-up, steps kept/lost, saving"),
    "sweep": ("sweep", "`sweep report RUN`: one row per task of a sweep (values, state, losses, tokens/s, GPU-h)"),
    "chat": ("chat", "terminal chat with a model (+ LoRA adapters): streaming, /think and /no_think"),
    "schema": ("schema", "print the JSON Schema of job specs (for editor completion)"),
    "launch": ("launch", "(on a node) start the task of RUN_DIR under torchrun"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="hpcqwen", description="Qwen3 training jobs on Slurm from one job spec.")
    parser.add_argument("--version", action="version", version=f"hpcqwen {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"hpcqwen.cli.{module}")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; map every exception to the documented exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except HpcqwenError as e:
        if args.debug:
            traceback.print_exc()
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception:  # noqa: BLE001 - the one place that turns bugs into exit code 70
        if args.debug:
            traceback.print_exc()
        else:
            exc = sys.exc_info()[1]
            print(f"error[internal]: {type(exc).__name__}: {clip(str(exc))}\n  hint: this is a bug in hpcqwen; "
                  "rerun with --debug and report the traceback", file=sys.stderr)
        return EXIT_INTERNAL


__all__ = ["EXIT_USAGE", "build_parser", "main"]
