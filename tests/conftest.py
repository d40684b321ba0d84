"""Shared fixtures: a private run root per test, the local Slurm cluster, spec files."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures_data import *  # noqa: F403 - session fixtures: tokenizers and tiny Qwen3 models

REPO = Path(__file__).resolve().parents[1]


# DeepSpeed JIT-builds a communication op on first use (~26 s); keep one build for the whole session.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hpcqwen-tests" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _private_run_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes run dirs under its own folder (the profiles read HPCQWEN_RUN_ROOT)."""
    root = tmp_path_factory.mktemp("runs")
    monkeypatch.setenv("HPCQWEN_RUN_ROOT", str(root))
    return root


@pytest.fixture
def run_root(_private_run_root: Path) -> Path:
    """The run root this test's submissions go to."""
    return _private_run_root


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str, str], Path]:
    """write_spec(text, name='spec.yaml') -> path of a dedented spec file."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path
    return write


@pytest.fixture
def hub_ids_cached(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE) holding an empty snapshot of every hub id of the shipped
    specs, so they validate with HF_HUB_OFFLINE=1 as on a cluster whose cache was filled beforehand."""
    from helpers import fake_hub_cache

    cache = fake_hub_cache(tmp_path_factory.mktemp("hf-hub-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The local Slurm cluster (cluster/local/up). Fails, never skips, when it does not answer."""
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        pytest.fail("Slurm client tools are not installed: run cluster/local/up (scripts/test.sh does)")
    if out.returncode != 0 or "UP" not in out.stdout:
        pytest.fail(f"the local Slurm cluster does not answer `scontrol ping` ({out.stdout.strip()} "
                    f"{out.stderr.strip()}): start it with cluster/local/up")
    return os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
