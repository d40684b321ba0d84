"""Rendering: golden scripts per variant, `bash -n`, inert values, and the script run with stubs.

Regenerate the goldens with HPCQWEN_UPDATE_GOLDEN=1 after an intended change, and read the diff.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
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
                         {"afterok": ["101"], "afterany": ["102_3"]} if spec.depends_on else {})


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


# ---- the script itself, run by bash with stub srun / scontrol on PATH -----------------------------

STUB_SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
env | grep '^EVIL=' -A3 > "$STUB_DIR/env-seen" || true
touch "$STUB_DIR/started"
if [ "${STUB_MODE:-ok}" = wait-stop ]; then
  while [ ! -f "$STUB_STOP_FILE" ]; do sleep 0.05; done
  echo "stub launcher: saved at stop" >> "$STUB_LOG"
fi
exit "${STUB_RC:-0}"
"""
STUB_SCONTROL = '#!/bin/bash\necho "scontrol $*" >> "$STUB_LOG"\n'


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_DIR": str(tmp_path), "HOME": str(tmp_path)}


def _script_for(tmp_path: Path, text: str) -> tuple[Path, RunPaths]:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text)
    source = read_source(spec_path)
    spec = parse_spec(source)
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(spec, paths, source))
    return script, paths


def test_values_render_inert(tmp_path: Path) -> None:
    evil = "$(touch {p}/pwned) `touch {p}/pwned2` ' \" ; touch {p}/pwned3\nline2 $HOME".format(p=tmp_path)
    # a YAML block scalar keeps the newline; the value reaches the script through `export EVIL=...`
    text = f"name: evil\ncluster: {{profile: local, run_root: {tmp_path}}}\nenv:\n  EVIL: |-\n"
    text += "".join(f"    {line}\n" for line in evil.splitlines())
    text += "task: {kind: command, module: m}\n"
    script, _ = _script_for(tmp_path, text)
    env = {**_stubs(tmp_path), "SLURM_JOB_ID": "77"}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
    assert not list(tmp_path.glob("pwned*")), "a spec value was executed"
    seen = (tmp_path / "env-seen").read_text()
    assert seen.startswith("EVIL=" + evil.splitlines()[0]) and "line2 $HOME" in seen


def test_success_passes_exit_code_and_does_not_requeue(tmp_path: Path) -> None:
    script, paths = _script_for(tmp_path, "name: ok\ntask: {kind: command, module: m}\n")
    env = {**_stubs(tmp_path), "SLURM_JOB_ID": "77", "STUB_RC": "3"}
    (paths.root / "STOP").touch()  # a stale stop file from the previous run is removed at start
    proc = subprocess.run(["bash", str(script)], env=env, timeout=30)
    assert proc.returncode == 3
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=1 ")
    assert calls[0].endswith(f"-m hpcqwen launch {paths.root}")
    assert not any(c.startswith("scontrol") for c in calls)
    assert not (paths.root / "STOP").exists()


def _signal_run(tmp_path: Path, text: str, env_extra: dict[str, str], stop_file: str) -> tuple[int, list[str]]:
    script, paths = _script_for(tmp_path, text)
    env = {**_stubs(tmp_path), "STUB_MODE": "wait-stop", "STUB_STOP_FILE": str(paths.root / stop_file),
           **env_extra}
    proc = subprocess.Popen(["bash", str(script)], env=env)
    deadline = time.time() + 20
    while not (tmp_path / "started").exists():
        assert time.time() < deadline, "the stub launcher never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    rc = proc.wait(timeout=30)
    return rc, (tmp_path / "calls.log").read_text().splitlines()


def test_usr2_touches_stop_waits_for_the_launcher_then_requeues(tmp_path: Path) -> None:
    rc, calls = _signal_run(tmp_path, "name: pre\ntask: {kind: command, module: m}\n", {"SLURM_JOB_ID": "77"},
                            "STOP")
    assert rc == 0
    assert calls[1:] == ["stub launcher: saved at stop", "scontrol requeue 77"]


def test_array_task_requeues_itself_by_array_id(tmp_path: Path) -> None:
    text = "name: arr\narray: {size: 4}\ntask: {kind: command, module: m}\n"
    env = {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "3"}
    rc, calls = _signal_run(tmp_path, text, env, "tasks/3/STOP")
    assert rc == 0 and calls[-1] == "scontrol requeue 50_3"


def test_restart_limit_stops_requeueing(tmp_path: Path) -> None:
    text = "name: pre\nrequeue: {max_restarts: 2}\ntask: {kind: command, module: m}\n"
    rc, calls = _signal_run(tmp_path, text, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}, "STOP")
    assert rc == 0 and not any(c.startswith("scontrol") for c in calls)


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
