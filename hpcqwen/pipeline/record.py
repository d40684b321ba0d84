"""The pipeline dir on the shared filesystem: `pipeline.json`, `pipeline.yaml` and one run dir per stage.

`<run_root>/<pipeline name>/<UTC stamp>-<hash>/` holds the file as written (`pipeline.yaml`), the
record (`pipeline.json`: each stage's run dir, kind, edges, references, job ids, earlier run dirs)
and `stages/<stage>/`, each a complete run dir (a stage redone because its input changed gets
`stages/<stage>.<n>/`). The record is written before the first sbatch (each stage's run dir is
known then) and again with the job ids; nodes read it to resolve `${stages...}` references. Like
a manifest it is untrusted input when read back: bounded, and job ids checked before use.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcqwen import fs
from hpcqwen.errors import RunDirError
from hpcqwen.fields import JOB_ID_RE

RECORD = "pipeline.json"
SOURCE = "pipeline.yaml"
STAGES = "stages"
RECORD_MAX_BYTES = 4 << 20


@dataclass
class StageRecord:
    """One stage as submitted."""

    run_dir: str
    kind: str
    after: list[list[str]]  # [[afterok | afterany, stage], ...]
    refs: list[list[str]]  # [[stage, output], ...]
    job_ids: list[str] = field(default_factory=list)
    earlier_run_dirs: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON object of pipeline.json."""
        return {"run_dir": self.run_dir, "kind": self.kind, "after": self.after, "refs": self.refs,
                "job_ids": self.job_ids, "earlier_run_dirs": self.earlier_run_dirs}


@dataclass
class PipelineRecord:
    """pipeline.json."""

    name: str
    file: str
    sha256: str
    submitted_at: str
    user: str
    stages: dict[str, StageRecord]  # producers before consumers
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON object of pipeline.json."""
        return {"name": self.name, "file": self.file, "sha256": self.sha256, "submitted_at": self.submitted_at,
                "user": self.user, "order": list(self.stages),
                "stages": {n: s.as_json() for n, s in self.stages.items()}, "resumes": self.resumes}


def new_record(name: str, file: str, sha256: str, stages: dict[str, StageRecord]) -> PipelineRecord:
    """A record stamped now, for this user."""
    return PipelineRecord(name, file, sha256, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                          getpass.getuser(), stages)


def write_record(pipeline_dir: Path, record: PipelineRecord) -> None:
    """Write pipeline.json atomically."""
    fs.write_json_atomic(pipeline_dir / RECORD, record.as_json())


def is_pipeline_dir(path: Path) -> bool:
    """A folder holding pipeline.json."""
    return (path / RECORD).is_file()


def pipeline_dir_of(run_dir: Path) -> Path | None:
    """The pipeline dir a stage's run dir belongs to (`<pipeline dir>/stages/<stage>`), else None."""
    parent = run_dir.parent
    return parent.parent if parent.name == STAGES and is_pipeline_dir(parent.parent) else None


def read_record(pipeline_dir: Path) -> PipelineRecord:
    """pipeline.json, checked (a RunDirError naming it when it is not what hpcqwen wrote)."""
    path = pipeline_dir / RECORD
    try:
        with open(path, "rb") as f:
            raw = f.read(RECORD_MAX_BYTES + 1)
        if len(raw) > RECORD_MAX_BYTES:
            raise ValueError("too large")
        data = json.loads(raw.decode("utf-8"))
        order = [str(n) for n in data.get("order") or data["stages"]]  # JSON objects are written with sorted keys
        stages = {n: _stage(data["stages"][n]) for n in order}
        return PipelineRecord(str(data["name"]), str(data["file"]), str(data["sha256"]), str(data["submitted_at"]),
                              str(data["user"]), stages, list(data.get("resumes") or []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunDirError(f"cannot read {path}: {str(e)[:200]}",
                          hint="give the pipeline dir that `hpcqwen pipeline submit` printed") from None


def _stage(s: dict[str, Any]) -> StageRecord:
    jobs = [str(j) for j in s.get("job_ids") or []]
    if not all(JOB_ID_RE.fullmatch(j) for j in jobs):
        raise ValueError(f"a job id is not a Slurm job id: {jobs[:3]}")
    return StageRecord(str(s["run_dir"]), str(s["kind"]), [list(map(str, e)) for e in s.get("after") or []],
                       [list(map(str, r)) for r in s.get("refs") or []], jobs,
                       [str(d) for d in s.get("earlier_run_dirs") or []])
