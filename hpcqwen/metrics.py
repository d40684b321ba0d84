"""`metrics.jsonl`: one JSON object per logging step, appended by rank 0, read by the monitor.

Keys (all optional except `step` and `time`): `step`, `total_steps`, `epoch`, `loss`, `lr`,
`grad_norm`, `tokens_per_s`, `peak_mem_gb`, `phase` (train | eval | generate | save | done),
`time` (unix seconds). Runners add their own: GRPO `reward_mean`, `reward_std`,
`rewards/<name>/mean`, `kl`, `completion_length`; distill `done`, `total`, `shards_done`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from hpcqwen import fs


class MetricsWriter:
    """Append-only writer; each line is flushed so the monitor sees it at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (NaN/inf become null: JSON has no such numbers)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line (a line being written is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def tail_metrics(path: Path, n: int = 50, block: int = 65536) -> list[dict[str, Any]]:
    """The last `n` records, reading only the end of the file (cheap on NFS for long runs)."""
    if not path.exists():
        return []
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - block))
        data = f.read()
    lines = data.decode(errors="replace").splitlines()
    if size > block:
        lines = lines[1:]  # the first line may be cut
    out = []
    for line in lines[-n:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def drop_after(path: Path, step: int) -> int:
    """Keep only the records up to `step` (rewritten atomically): a run resumed from the checkpoint
    of `step` logs the later steps again, and metrics.jsonl holds each step once. Returns the
    number of records dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn line of a killed writer
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > step:
            continue
        kept.append(line)
    if len(kept) != len(lines):
        fs.write_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)
