"""The rollout server's pure parts (command line against TRL's, GPU split, node roles, endpoint keying, the
trainers' world size) and the watch against a real process (a stub HTTP server stands in for vLLM)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpcqwen import rollout
from hpcqwen.launch import launch_env
from hpcqwen.spec import load_spec

SPEC = """\
name: r
cluster: {profile: local, run_root: %s}
resources: {nodes: 3, nproc_per_node: 2}
task:
  kind: grpo
  model: %s
  dataset: %s
  reward_funcs: [accuracy]
  num_generations: 4
  per_device_train_batch_size: 2
  use_vllm: true
  vllm_mode: server
  rollout: {nodes: 1}
"""


def task_ns(**rollout_fields: object) -> SimpleNamespace:
    r = SimpleNamespace(tensor_parallel_size=2, data_parallel_size=1, gpu_memory_utilization=0.5, **rollout_fields)
    return SimpleNamespace(model="/m", torch_dtype="bfloat16", seed=7, vllm_max_model_len=4096, rollout=r)


def test_serve_argv_carries_every_flag_trl_adds_to_vllm_serve() -> None:
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    ours = rollout.serve_argv("/py", task_ns(), 8123)
    trl = build_command(ScriptArguments(model="/m", tensor_parallel_size=2, port=8123, gpu_memory_utilization=0.5,
                                        dtype="bfloat16", max_model_len=4096))
    flags = {a for a in trl if a.startswith("--")} - {"--enable-scale-out", "--kv-cache-dtype", "--model-impl"}
    assert flags <= set(ours), flags - set(ours)  # TRL 1.16's weight-transfer, logprobs and size flags
    for flag in ("--weight-transfer-config", "--logprobs-mode", "--max-logprobs", "--tensor-parallel-size",
                 "--max-model-len", "--port"):
        assert ours[ours.index(flag) + 1] == trl[trl.index(flag) + 1]
    assert ours[:4] == ["/py", "-m", rollout.SERVE_MODULE, "--model"] and ours[4] == "/m"


def test_serve_env_turns_on_dev_mode_and_drops_the_ranks_variables() -> None:
    env = rollout.serve_env({"RANK": "3", "MASTER_PORT": "1", "PATH": "/bin", "VLLM_CACHE_ROOT": "/mine"}, "/cache")
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "RANK" not in env and "MASTER_PORT" not in env
    assert env["VLLM_CACHE_ROOT"] == "/mine" and env["TRITON_CACHE_DIR"] == "/cache/triton"  # the job's own wins


@pytest.mark.parametrize(("visible", "nproc", "engine", "ranks", "server"), [
    (["0", "1", "2", "3"], 3, 1, ["0", "1", "2"], ["3"]),  # enough GPUs: the server takes the last
    (["0", "1", "2", "3"], 2, 2, ["0", "1"], ["2", "3"]),
    (["0"], 1, 1, ["0"], ["0"]),  # one GPU: both share it
    ([], 2, 1, [], []),  # CPU
])
def test_split_gpus(visible: list[str], nproc: int, engine: int, ranks: list[str], server: list[str]) -> None:
    assert rollout.split_gpus(visible, nproc, engine) == (ranks, server)


def test_node_roles_and_the_trainers_world(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    path = tmp_path / "s.yaml"
    data = Path(__file__).parents[2] / "jobspecs/data/math-tiny.jsonl"
    path.write_text(SPEC % (tmp_path / "runs", tiny_qwen3_dir, data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCQWEN_TEST_ROLLOUT_ON_CPU", "1")
        spec = load_spec(path)
    assert spec.world_size == 4  # 3 nodes, the last serves: 2 trainer nodes × 2 processes
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-3]"}
    le = launch_env(env, spec, str(tmp_path))
    assert (le.nnodes, le.env["WORLD_SIZE"], le.master_addr) == (2, "4", "n1")
    assert [rollout.node_role(spec, r, 2, True) for r in range(3)] == ["train", "train", "serve"]
    with pytest.raises(rollout.RolloutError, match="not in a Slurm allocation") as info:
        rollout.node_role(spec, 0, 1, in_slurm=False)
    assert "use rollout.nodes: 0" in (info.value.hint or "")
    cohost = spec.model_copy(update={"task": spec.task.model_copy(update={"rollout": spec.task.rollout.model_copy(
        update={"nodes": 0})})})
    assert [rollout.node_role(cohost, r, 1, False) for r in range(2)] == ["cohost", "train"]


def test_an_endpoint_of_another_attempt_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / rollout.ENDPOINT
    rollout.publish(path, rollout.Endpoint("n3", 4000, "77", 0))
    assert rollout.read_endpoint(path, "77", 1) is None  # a requeued attempt waits for its own server
    assert rollout.read_endpoint(path, "78", 0) is None
    assert rollout.read_endpoint(path, "77", 0) == rollout.Endpoint("n3", 4000, "77", 0)
    rollout.publish(path, rollout.Endpoint("n3", 4000, "77", 0, "failed", "exited with code 1"))
    with pytest.raises(rollout.RolloutError, match="n3:4000 exited with code 1"):
        rollout.wait_endpoint(path, "77", 0, timeout_s=5)
    with pytest.raises(rollout.RolloutError, match="within 1 s"):
        rollout.wait_endpoint(path, "77", 2, timeout_s=1)


STUB = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_watch_reports_a_stub_http_server_that_dies(tmp_path: Path) -> None:
    port = rollout.free_port()
    stub = subprocess.Popen([sys.executable, "-c", STUB, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        assert rollout.wait_healthy(url, 20) < 20
        lost: list[str] = []
        done = threading.Event()
        watch = rollout.Watch(url, lambda why: (lost.append(why), done.set()))
        watch.start()
        time.sleep(2 * rollout.HEALTH_POLL_S)
        assert lost == []  # healthy: nothing reported
        stub.kill()
        killed = time.monotonic()
        assert done.wait(30) and time.monotonic() - killed <= (rollout.WATCH_MISSES + 2) * rollout.HEALTH_POLL_S
        assert lost == [f"the rollout server at {url} stopped answering /health (3 checks, 6 s)"]
    finally:
        stub.kill()
