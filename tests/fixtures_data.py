"""Session fixtures for the data layer and tiny-model tests: tokenizers and tiny Qwen3 models.

Loaded as a pytest plugin (`pytest_plugins = ["fixtures_data"]` in tests/conftest.py). Everything
is built offline at test time with `hpcqwen.testing` (about 2 s for the real tokenizer, 1 s for
each tiny model).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the hub: fail fast instead of waiting on a network timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The datasets shipped with the job specs (`jobspecs/data`)."""
    return REPO / "jobspecs" / "data"


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full real Qwen3 tokenizer (151,669 tokens) with TRL's Qwen3 chat template."""
    from hpcqwen.testing import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok-qwen3-real"), truncated=False)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3's BPE cut to its first 4000 merges (4,282 tokens), same specials and template."""
    from hpcqwen.testing import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok-qwen3-trunc"), truncated=True)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random dense Qwen3 (hidden 64, 2 layers, head_dim 32) with the truncated tokenizer."""
    from hpcqwen.testing import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3-tiny") / "model", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random Qwen3-MoE (4 experts, top-2, head_dim 32) with the truncated tokenizer."""
    from hpcqwen.testing import build_tiny_qwen3

    return build_tiny_qwen3(
        tmp_path_factory.mktemp("qwen3moe-tiny") / "model", tiny_tokenizer_dir, moe=True
    )
