"""Shared fixtures: a private run root per test, the local Slurm cluster, spec files."""

from __future__ import annotations

import fcntl
import os
import subprocess
import textwrap
from collections.abc import Callable, Iterator
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


# ---- several test processes (scripts/test.sh runs pytest-xdist) share one cluster -------------------------------
# Tests of these files preempt, set nodes down, pin jobs to nodes, count the controller's RPCs or time hangs: no
# other test's job may be on the cluster meanwhile. Such a file holds the cluster lock alone while it runs; every
# other `slurm` file holds it shared. The lock is held per file, not per test, because module fixtures submit jobs
# that outlive one test (the monitor's long-lived jobs). A writer first takes the gate, which keeps new readers
# out while it waits for the running ones (no starvation). The files that need it (one home for this fact):
EXCLUSIVE_FILES = frozenset({"test_soak.py", "test_preemption.py", "test_shared_nodes.py", "test_queue_scale.py",
                             "test_watchdog_slurm.py"})
LOCKS = Path(os.environ.get("HPCQWEN_TEST_LOCK_DIR", "/tmp/hpcqwen-test-locks"))


def _exclusive(nodeid: str) -> bool:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in EXCLUSIVE_FILES


@pytest.fixture(autouse=True, scope="module")
def _cluster_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """Autouse and module scope: taken before the module's other fixtures (those that submit jobs)."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    LOCKS.mkdir(mode=0o777, parents=True, exist_ok=True)
    with open(LOCKS / "gate", "a") as gate, open(LOCKS / "cluster", "a") as cluster:
        if _exclusive(request.node.nodeid):
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(cluster, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(cluster, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # the files close (and unlock) after the module


# Order: the exclusive tests (the cluster's serial chain) first, the CPU tiers next (they overlap that chain: an
# exclusive test keeps other cluster tests out, not CPU ones), unit tests, the other cluster files last, the
# longest of those first (a long file handed out last would run on alone at the end).
LONG_CLUSTER_FILES = ("test_pipeline_slurm.py", "test_cache_bench.py", "test_sweep_slurm.py", "test_grpo_slurm.py",
                      "test_sft_slurm.py", "test_core.py", "test_signals.py", "test_container_stub.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> tuple[int, int]:
        if _exclusive(item.nodeid):
            return 0, 0
        if item.get_closest_marker("slurm"):
            name = item.path.name
            return 3, LONG_CLUSTER_FILES.index(name) if name in LONG_CLUSTER_FILES else len(LONG_CLUSTER_FILES)
        return (1 if any(item.get_closest_marker(t) for t in TIERS) else 2), 0
    items.sort(key=rank)  # stable: the order inside a rank is pytest's


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Each file runs on one worker (its module fixtures are made once), and all exclusive files on one worker,
    one after the other; workers take the next file in the order above when they are free."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster-exclusive" if _exclusive(nodeid) else nodeid.split("::", 1)[0]

    return ByFile(config, log)  # type: ignore[arg-type]


# ---- the end of a run: a count and time per tier (scripts/test.sh also asks for --durations=25) ----------------
TIERS = ("slurm", "cpu_dist", "cpu_train", "slow", "gpu")  # the first a test has names its tier; none: unit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """`tests per tier`: outcomes and seconds per marker tier, so a 25-minute run says where the time went."""
    counts: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            keywords = getattr(report, "keywords", {})
            if not hasattr(report, "when"):
                continue  # a collection error: pytest reports it above
            tier = next((t for t in TIERS if t in keywords), "unit")
            if report.when == "call" or outcome in ("error", "skipped"):
                counts.setdefault(tier, {}).setdefault(outcome, 0)
                counts[tier][outcome] += 1
    for reports in terminalreporter.stats.values():
        for report in reports:
            if hasattr(report, "when") and hasattr(report, "duration"):
                tier = next((t for t in TIERS if t in getattr(report, "keywords", {})), "unit")
                seconds[tier] = seconds.get(tier, 0.0) + report.duration
    if not counts:
        return
    terminalreporter.write_sep("=", "tests per tier")
    for tier in ("unit", *TIERS):
        if tier in counts:
            parts = ", ".join(f"{n} {outcome}" for outcome, n in counts[tier].items())
            terminalreporter.write_line(f"{tier}: {parts} in {seconds.get(tier, 0.0):.0f} s")
