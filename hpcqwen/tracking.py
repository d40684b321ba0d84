"""Experiment tracking (`task.report_to`: tensorboard, wandb, mlflow, none): where each tracker writes, the
run's name and id, and a small tracker for runners without transformers' callbacks (Megatron).

Every tracker works offline by default, since compute nodes often have no internet, and writes under the
task dir:
- tensorboard: `TASK_DIR/tensorboard/`;
- wandb: `WANDB_MODE=offline` unless the job's environment sets WANDB_MODE, files in `TASK_DIR/wandb/`
  (`wandb sync` them later, or export WANDB_MODE=online and WANDB_API_KEY in the submitting shell); the
  run id is the run dir's name (+ the array index) and `WANDB_RESUME=allow`, so a requeued attempt continues
  the same run; project = the spec's name unless WANDB_PROJECT is set; tag `slurm-job-<id>`;
- mlflow: a file store `TASK_DIR/mlruns` unless MLFLOW_TRACKING_URI is set (MLflow 3 calls the file store
  "maintenance mode" and wants MLFLOW_ALLOW_FILE_STORE=true, set here for it only); experiment = the spec's
  name unless MLFLOW_EXPERIMENT_NAME is set; tags hpcqwen.job_id, hpcqwen.run_dir, hpcqwen.array_index; the
  run id is kept in `TASK_DIR/.mlflow-run-id` so a requeued attempt logs into the same run.
A user's own setting of any of these variables wins. Credentials are never written: they come from the
submitting shell's environment (specs refuse secret-looking names), and WANDB_API_KEY is removed from the
ranks' environment in offline mode, where it is not needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
MLFLOW_RUN_ID_FILE = ".mlflow-run-id"


def run_name(spec_name: str, array_index: int | None) -> str:
    """The name every tracker shows: the spec's name, `-task<i>` for an array task."""
    return spec_name if array_index is None else f"{spec_name}-task{array_index}"


def run_id(run_dir: Path, array_index: int | None) -> str:
    """A stable id for the task's run: the run dir's name (unique per submission) and the array index."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)
    return base if array_index is None else f"{base}-{array_index}"


def tracking_env(report_to: Sequence[str], spec_name: str, run_dir: Path, task_dir: Path, array_index: int | None,
                 job_id: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the trackers read, for those in `report_to`; a variable set in `environ` is kept."""
    env = {"TENSORBOARD_LOGGING_DIR": str(task_dir / "tensorboard")}
    if "wandb" in report_to:
        env.update(WANDB_DIR=str(task_dir), WANDB_MODE="offline", WANDB_PROJECT=spec_name,
                   WANDB_NAME=run_name(spec_name, array_index), WANDB_RUN_ID=run_id(run_dir, array_index),
                   WANDB_RESUME="allow", WANDB_RUN_GROUP=spec_name, WANDB_TAGS=f"slurm-job-{job_id}")
    if "mlflow" in report_to:
        tags = {"hpcqwen.job_id": job_id, "hpcqwen.run_dir": str(run_dir),
                "hpcqwen.array_index": "" if array_index is None else str(array_index)}
        env.update(MLFLOW_TRACKING_URI=f"file:{task_dir / 'mlruns'}", MLFLOW_EXPERIMENT_NAME=spec_name,
                   MLFLOW_TAGS=json.dumps(tags))
        if not environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        previous = _read_run_id(task_dir / MLFLOW_RUN_ID_FILE)
        if previous:
            env["MLFLOW_RUN_ID"] = previous
    return {k: v for k, v in env.items() if not environ.get(k)}


def apply_tracking_env(report_to: Sequence[str], spec_name: str, run_dir: Path, task_dir: Path,
                       environ: MutableMapping[str, str] | None = None) -> str:
    """Set the trackers' variables in this process (a runner, before its trainer starts; the job id and
    array index come from the launcher's HPCQWEN_* variables); returns the run's name."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("HPCQWEN_JOB_ID") or environ.get("SLURM_JOB_ID") or "local"
    index = environ.get("HPCQWEN_ARRAY_TASK_ID") or ""
    array_index = int(index) if index.isdigit() else None
    environ.update(tracking_env(report_to, spec_name, run_dir, task_dir, array_index, job_id, environ))
    if "wandb" in report_to and environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        environ.pop("WANDB_API_KEY", None)  # not needed offline: nothing in this process can write it anywhere
    return run_name(spec_name, array_index)


def hf_report_to(report_to: Sequence[str]) -> list[str]:
    """TrainingArguments.report_to: the trackers, or 'none'."""
    chosen = [r for r in report_to if r in TRACKERS]
    return chosen or ["none"]


def remember_mlflow_run(task_dir: Path) -> None:
    """Keep the active MLflow run's id in the task dir (rank 0, after the run started), for a requeued attempt."""
    import mlflow

    run = mlflow.active_run()
    if run is not None and _read_run_id(task_dir / MLFLOW_RUN_ID_FILE) != run.info.run_id:
        from hpcqwen import fs

        fs.write_atomic(task_dir / MLFLOW_RUN_ID_FILE, run.info.run_id + "\n")


def mlflow_run_callback(task_dir: Path) -> Any:
    """A transformers callback that keeps the MLflow run's id once transformers' MLflowCallback started it
    (callbacks run in order: the reporting ones first)."""
    from transformers import TrainerCallback

    class RememberMlflowRun(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                remember_mlflow_run(task_dir)

    return RememberMlflowRun()


def _read_run_id(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return text if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text) else ""


class Tracker:
    """The trackers of `report_to` for a runner that logs itself (Megatron), on one process: numbers of each
    metrics record go to TensorBoard, wandb and MLflow with the record's step."""

    def __init__(self, report_to: Sequence[str], name: str, task_dir: Path, config: Mapping[str, Any]) -> None:
        self.task_dir = task_dir
        self.tb: Any = None
        self.wandb: Any = None
        self.mlflow: Any = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.environ.get("TENSORBOARD_LOGGING_DIR") or str(task_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(name=name, config=dict(config))
        if "mlflow" in report_to:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or name)
            mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID") or None,
                             run_name=None if os.environ.get("MLFLOW_RUN_ID") else name)
            mlflow.set_tags(json.loads(os.environ.get("MLFLOW_TAGS") or "{}"))
            remember_mlflow_run(task_dir)
            self.mlflow = mlflow

    def log(self, record: Mapping[str, Any]) -> None:
        """The record's finite numbers, at its step (`phase` eval: keys as written, e.g. eval_loss)."""
        step = int(record.get("step") or 0)
        numbers = {k: float(v) for k, v in record.items()
                   if k not in ("step", "total_steps", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and v == v and abs(v) != float("inf")}
        if not numbers:
            return
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)

    def close(self) -> None:
        """Flush and finish every tracker."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
