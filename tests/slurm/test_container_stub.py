"""Container jobs end to end on the local Slurm cluster, through a stub runtime around a real container
(issue 13 item 6).

No real container runtime for HPC runs here: Debian 12 has no apptainer package and pyxis/enroot are not
packaged either; crun 1.8.1 refuses this machine ("cgroups in hybrid mode not supported, drop all controllers
from cgroupv2"); Slurm 22.05's native OCI support (`--container`, oci.conf) would need a cluster restart.
runc 1.1.5 does run here, so the stub runtimes in tests/container_stub/ (`apptainer exec` and pyxis's
`srun --container-*`: the command lines are stubs) start a real runc container: a new mount namespace whose
root is a read-only image holding only the system, Python and the venv with hpcqwen, and the bind mounts
hpcqwen asked for (read-only ones enforced by the kernel). Before the fix only the run root was mounted,
so the model, the data and the caches did not exist inside and the jobs failed."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from hpcqwen import runs
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK
from hpcqwen.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_train]
REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "tests" / "container_stub"
DATA = REPO / "jobspecs" / "data" / "sft-tiny.jsonl"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder for the stub runtime: an empty root plus, read-only, /usr, /etc, this Python, the venv
    with hpcqwen's dependencies and this checkout (hpcqwen "installed" in the image, on PYTHONPATH)."""
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed: apt-get install runc (scripts/setup.sh does)")
    folder = tmp_path_factory.mktemp("image")
    rootfs = folder / "rootfs"
    for d in ("usr", "etc", "proc", "dev", "sys", "tmp"):
        (rootfs / d).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):  # Debian 12's merged /usr
        if Path("/" + link).is_symlink():
            (rootfs / link).symlink_to(os.readlink("/" + link))
    layers = ["/usr", "/etc", sys.base_prefix, sys.prefix, str(REPO)]
    (folder / "layers.json").write_text(json.dumps(layers))
    return folder


def _submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], image: Path,
            runtime: str, task: str, backend: str = "slurm") -> tuple[Path, str, list[str]]:
    """Submit `task` on a container profile with the stub runtimes on PATH; wait; (run dir, logs, states)."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "box.yaml").write_text(
        f"partition: debug\ncpus_per_gpu: 1\nrun_root: ${{HPCQWEN_RUN_ROOT}}\npython: {sys.executable}\n"
        f"container: {{runtime: {runtime}, image: {image}}}\n")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))
    monkeypatch.setenv("PATH", f"{STUBS}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "bundles").mkdir()
    monkeypatch.setenv("STUB_BUNDLES", str(tmp_path / "bundles"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: box6-{uuid.uuid4().hex[:6]}\ncluster: {{profile: box, cache_root: {tmp_path}/cache/new}}\n"
                    f"resources: {{time_limit_min: 10}}\nenv: {{OMP_NUM_THREADS: '1'}}\n{task}")
    assert main(["submit", str(spec), "--backend", backend]) == EXIT_OK
    run_dir = Path(capsys.readouterr().out.split("run dir: ")[1].split()[0])
    rows = runs.wait_for(runs.resolve_target(str(run_dir)), max_poll_s=3)
    logs = "".join(p.read_text() for p in sorted(run_dir.rglob("*.out")))
    return run_dir, logs, [r.slurm_state for r in rows]


@pytest.mark.parametrize("runtime", ["apptainer", "pyxis"])
def test_stub_runtime_sft_in_a_container_sees_model_data_and_caches(slurm_cluster: str, image: Path, tmp_path: Path,
                                                                   runtime: str, tiny_qwen3_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(DATA, tmp_path / "data" / "train.jsonl")
    (tmp_path / "hf").mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    task = (f"task: {{kind: sft, model: {tiny_qwen3_dir}, dataset: [{tmp_path}/data/train.jsonl], "
            "torch_dtype: float32, max_steps: 2, save_steps: 2, logging_steps: 1, max_length: 128, "
            "gradient_checkpointing: false}\n")
    run_dir, logs, states = _submit(tmp_path, monkeypatch, capsys, image, runtime, task)
    assert f"stub {runtime}: image {image}" in logs, logs[-3000:]
    assert states == ["COMPLETED"], logs[-3000:]
    assert (run_dir / "checkpoints" / "checkpoint-2" / "hpcqwen-complete.json").is_file()
    assert any((tmp_path / "cache" / "new").iterdir())  # the tokenized data went to the mounted cache root
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m] == [1, 2]
    assert json.loads((run_dir / "manifest.json").read_text())["interpreter"] == sys.executable


def test_stub_runtime_submitit_backend_in_a_pyxis_container(slurm_cluster: str, image: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    task = "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '2']}\n"
    run_dir, logs, states = _submit(tmp_path, monkeypatch, capsys, image, "pyxis", task, backend="submitit")
    assert "stub pyxis: image" in logs and "steps: finished 2 steps" in logs, logs[-3000:]
    assert states == ["COMPLETED"], logs[-3000:]
