"""Rendering: golden scripts per variant, `bash -n`, and the guide's GRPO command flag by flag (the
script run with stub srun/scontrol is in test_batch_script.py).

Regenerate the goldens with HPCQWEN_UPDATE_GOLDEN=1 after an intended change, and read the diff.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcqwen.paths import RunPaths
from hpcqwen.render import format_time, render_sbatch
from hpcqwen.spec import SpecSource, load_spec, parse_spec, read_source

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PINNED = "cluster: {profile: local, python: /opt/venv/bin/python, run_root: /shared/runs}\n"
VARIANTS = {
    "one_node": PINNED + "name: one\ntask: {kind: command, module: hpcqwen.examples.allreduce}\n",
    "two_nodes_2gpu": PINNED + """name: two
resources: {nodes: 2, gpus_per_node: 2, mem_gb: 16, time_limit_min: 1500, constraint: h100}
env: {NCCL_DEBUG: INFO}
task: {kind: command, module: hpcqwen.examples.allreduce}
""",
    "array_throttle": PINNED + """name: shards
array: {size: 8, throttle: 2}
requeue: {max_restarts: 5, signal_lead_s: 300}
task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '10']}
""",
    "no_requeue_depends": PINNED + """name: after
depends_on: [101, 'afterany:102_3']
requeue: {enabled: false}
task: {kind: command, module: m}
""",
    "site_container": """name: site
cluster:
  profile: h100-8x
  run_root: /shared/runs
  container: {image: nvcr.io/nvidia/pytorch:25.01-py3, mounts: ['/data:/data']}
resources: {nodes: 2}
task: {kind: command, module: m}
""",
}


def _render(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    spec = load_spec(path)
    source = SpecSource(f"jobspecs/{name}.yaml", text, "0" * 64)
    return render_sbatch(spec, RunPaths(Path(f"/shared/runs/{spec.name}/20260101T000000Z-abcdef")), source,
                         {"afterok": ["101"], "afterany": ["102_3"]} if spec.depends_on else {},
                         environ={})  # no cache folders from this machine's environment in the container's mounts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden_script(tmp_path: Path, variant: str) -> None:
    script = _render(tmp_path, variant, VARIANTS[variant])
    golden = GOLDEN / f"{variant}.sh"
    if os.environ.get("HPCQWEN_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"regenerate with HPCQWEN_UPDATE_GOLDEN=1 if intended ({golden})"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_golden_preview_of_render(tmp_path: Path) -> None:
    """`hpcqwen render` is a dry run: its header says so instead of naming a job.sbatch that does not exist."""
    text = VARIANTS["one_node"]
    (tmp_path / "one.yaml").write_text(text)
    spec = load_spec(tmp_path / "one.yaml")
    source = SpecSource("jobspecs/one_node.yaml", text, "0" * 64, ("task.args=[a b]",))
    script = render_sbatch(spec, RunPaths(Path("/shared/runs/one/20260101T000000Z-abcdef")), source, preview=True)
    golden = GOLDEN / "one_node_preview.sh"
    if os.environ.get("HPCQWEN_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"regenerate with HPCQWEN_UPDATE_GOLDEN=1 if intended ({golden})"
    assert "Run with" not in script and "hpcqwen submit jobspecs/one_node.yaml --set 'task.args=[a b]'" in script


def test_render_previews_and_submit_names_the_real_script(write_spec, run_root: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from hpcqwen.cli import main
    from hpcqwen.submit import prepare_run_dir

    path = write_spec("name: prev\ntask: {kind: command, module: m}\n")
    assert main(["render", str(path)]) == 0
    header = capsys.readouterr().out.splitlines()[:4]
    assert header[2].startswith("# Preview from `hpcqwen render`: nothing was written and no run dir exists.")
    assert not list(run_root.iterdir())
    source = read_source(path)
    paths = prepare_run_dir(parse_spec(source), source, "slurm", {})
    assert paths.sbatch.read_text().splitlines()[2] == f"# Run with: sbatch {paths.sbatch}" and paths.sbatch.is_file()


def test_template_stays_small() -> None:
    template = Path(__file__).resolve().parents[2] / "templates" / "sbatch.sh.j2"
    assert len(template.read_text().splitlines()) <= 60


def test_time_format() -> None:
    assert [format_time(m) for m in (1, 59, 60, 1500)] == ["00:01:00", "00:59:00", "01:00:00", "1-01:00:00"]


# The guide's `swift rlhf --rlhf_type grpo` command (qwen3-best-practices.md), flag by flag, with
# NPROC_PER_NODE=8; --rlhf_type becomes `kind` and --output_dir is the run dir.
GUIDE_GRPO = {
    "model": '"Qwen/Qwen3-8B"', "train_type": '"full"', "dataset": '["AI-MO/NuminaMath-TIR#5000"]',
    "torch_dtype": '"bfloat16"', "num_train_epochs": "1.0", "per_device_train_batch_size": "2",
    "per_device_eval_batch_size": "2", "learning_rate": "1e-06", "save_total_limit": "2", "logging_steps": "5",
    "gradient_accumulation_steps": "1", "warmup_ratio": "0.05", "dataloader_num_workers": "4",
    "max_length": "4096", "max_completion_length": "4096", "vllm_max_model_len": "8192",
    "reward_funcs": '["accuracy"]', "num_generations": "16", "use_vllm": "true",
    "vllm_gpu_memory_utilization": "0.4", "sleep_level": "1", "offload_model": "true", "offload_optimizer": "true",
    "gc_collect_after_offload": "true", "deepspeed": '"zero3"', "num_infer_workers": "8",
    "tensor_parallel_size": "1", "temperature": "1.0", "top_p": "0.85", "log_completions": "true",
    "overlong_filter": "true",
}


@pytest.mark.usefixtures("hub_ids_cached")  # offline, the hub ids must be in the cache
def test_grpo_spec_renders_the_guides_8_gpu_command(capsys: pytest.CaptureFixture[str]) -> None:
    from hpcqwen.cli import main

    assert main(["render", str(Path(__file__).resolve().parents[2] / "jobspecs" / "grpo.yaml")]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --nodes=1" in script
    assert "#   kind: \"grpo\"" in script
    for flag, value in GUIDE_GRPO.items():
        assert f"#   {flag}: {value}\n" in script, flag
