"""Job arrays larger than the cluster's MaxArraySize: chunks, each its own `sbatch --array`.

Slurm refuses array indices at or above MaxArraySize, so chunk k of an array of n tasks runs local
indices 0..m-1 and stands for tasks `k × limit + i`: its script exports `HPCQWEN_ARRAY_OFFSET`
(the launcher adds it to SLURM_ARRAY_TASK_ID) and the manifest records each chunk's job id and
offset (`array_chunks`), which `with_offsets` applies to the rows squeue and sacct return. With a
throttle, chunk k+1 waits for chunk k (afterany), so no more than `array.throttle` tasks run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

OFFSET_ENV = "HPCQWEN_ARRAY_OFFSET"


def chunks(count: int, limit: int) -> list[tuple[int, int]]:
    """[(offset, tasks)] covering 0..count-1 in pieces of at most `limit`."""
    return [(start, min(limit, count - start)) for start in range(0, count, max(1, limit))]


def group_tasks(tasks: Sequence[int], limit: int) -> list[tuple[int, list[int]]]:
    """Global task indices -> [(offset, local indices)] by chunk (a resubmission of some tasks)."""
    groups: dict[int, list[int]] = {}
    for t in sorted(set(tasks)):
        offset = (t // limit) * limit
        groups.setdefault(offset, []).append(t - offset)
    return sorted(groups.items())


def offsets_of(manifest: Mapping[str, Any]) -> dict[str, int]:
    """{job id: task offset} of a run's chunked (or resubmitted) arrays; {} for a plain array."""
    out = {}
    for c in manifest.get("array_chunks") or []:
        if isinstance(c, dict) and str(c.get("job_id", "")).isdigit() and isinstance(c.get("offset"), int):
            out[str(c["job_id"])] = int(c["offset"])
    return out


def with_offsets(rows: Iterable[Any], offsets: Mapping[str, int]) -> list[Any]:
    """JobRows with each chunk's local array index turned into the run's task index."""
    out = []
    for r in rows:
        off = offsets.get(r.array_job_id, 0)
        if off and r.array_task_id is not None:
            r = dataclasses.replace(r, array_task_id=r.array_task_id + off)
        out.append(r)
    return out
