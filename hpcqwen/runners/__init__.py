"""Runners: one self-contained module per task kind, each `main(run_dir)` + `__main__`.

RUNNERS maps `task.kind` to the module the launcher starts (`python -m <module> RUN_DIR`).
"""

RUNNERS = {
    "sft": "hpcqwen.runners.sft",
    "grpo": "hpcqwen.runners.grpo",
    "distill": "hpcqwen.runners.distill",
    "megatron": "hpcqwen.runners.megatron",
}
