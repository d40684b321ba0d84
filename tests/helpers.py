"""Small helpers shared by test modules (importable: tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_until(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    """pred()'s first truthy value, polled every `every` s; AssertionError naming `what` after `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under `root`: (mode, size, sha256 of files); equal snapshots, unchanged tree."""
    import hashlib

    return {p.relative_to(root).as_posix(): (p.lstat().st_mode, p.lstat().st_size,
                                             hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in [root, *root.rglob("*")]}


@contextlib.contextmanager
def immutable(root: Path) -> Iterator[None]:
    """`chattr -R +i root` for the block: not even root may write, add or remove anything there."""
    import pytest

    out = subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"chattr +i failed ({out.stderr.strip()}): this test needs a filesystem with immutable "
                    "attributes (ext4, xfs, btrfs) under the test's tmp dir, and root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)

def shipped_hub_ids() -> set[tuple[str, str]]:
    """(repo type, hub id) of every model and dataset the shipped specs name by hub id."""
    import yaml

    from hpcqwen.tasks._common import is_hub_id, split_dataset_ref

    found = set()
    for path in (REPO / "jobspecs").glob("*.yaml"):
        task = yaml.safe_load(path.read_text()).get("task", {})
        for key, kind in (("model", "model"), ("load", "model"), ("dataset", "dataset"), ("val_dataset", "dataset")):
            refs = task.get(key) or []
            for ref in [refs] if isinstance(refs, str) else refs:
                name = split_dataset_ref(ref)[0] if kind == "dataset" else ref
                if is_hub_id(name):
                    found.add((kind, name))
    return found


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache (for HF_HUB_CACHE) with an empty snapshot of every hub id of the shipped specs."""
    for kind, repo in shipped_hub_ids():
        (root / f"{kind}s--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    return root


def scontrol_requeue(job_id: str) -> None:
    """What an admin (or a preemption) does: requeue a running job; it restarts with SLURM_RESTART_COUNT + 1."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
