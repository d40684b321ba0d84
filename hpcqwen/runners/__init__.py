"""Runners: one self-contained module per task kind, each `main(run_dir)` + `__main__`; the task model
names its module (`task.runner_module()`), which the launcher starts as `python -m <module> RUN_DIR`."""
