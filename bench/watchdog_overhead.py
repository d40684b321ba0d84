"""The hang watchdog's cost and speed, measured side by side in one call.

    python bench/watchdog_overhead.py              # 3 × (on, off) SFT runs of 60 steps, 10 injected hangs
    python bench/watchdog_overhead.py --ci         # 1 × (on, off) of 20 steps, 2 hangs (a test runs it)

1. Overhead: a tiny Qwen3 LoRA SFT on 2 ranks (gloo; `hpcqwen submit --backend local --wait`: the real launcher,
   runner, callbacks, heartbeats and watcher) with `watchdog.enabled` true and false, interleaved (on, off,
   on, off, ...) so both see the same machine load; tokens/s is the median of the runs' logged `tokens_per_s`
   after the first 5 steps. A tiny model has millisecond steps, so this is the watchdog's worst case.
   On a shared 2-core machine the runs' own spread (±20 %) hides a 1 % effect, so the same call also measures
   the watchdog's cost per training step directly: the HeartbeatCallback's calls of one step (forward
   hooks, optimizer, step end, with the heartbeat file written once per interval as in a run) timed over
   20,000 steps, over the median step time of the `off` runs.
2. Detection latency: two launchers on this machine (SLURM_NODEID 0 and 1; `hpcqwen.examples.beating`, a
   gloo all_reduce loop), rank 1 hangs at step 20 (test-only hook); latency = the watcher's verdict time
   (`hangs/<time>/verdict.json`) minus the moment the rank started to hang (`.fault-hang-1.json`), with
   hang_timeout_s 3 and poll_interval_s 0.5: the bound is hang_timeout + one poll (3.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobspecs" / "data" / "sft-tiny.jsonl"
HANG_S, POLL_S = 3, 0.5


def env_for(root: Path) -> dict[str, str]:
    """The environment of every child: this checkout first, a private run root, offline."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCQWEN_TEST"))},
            "PYTHONPATH": str(REPO), "HPCQWEN_RUN_ROOT": str(root / "runs"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def sft_run(root: Path, model: Path, steps: int, enabled: bool, n: int) -> tuple[float, float]:
    """One SFT run; the median logged tokens/s after step 5 and the median seconds per step."""
    spec = root / f"sft-{n}-{'on' if enabled else 'off'}.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: wdbench-{n}-{'on' if enabled else 'off'}
        resources: {{nproc_per_node: 2}}
        watchdog: {{enabled: {str(enabled).lower()}, hang_timeout_s: 60, poll_interval_s: 1}}
        task: {{kind: sft, model: {model}, dataset: [{DATA}], torch_dtype: float32, max_steps: {steps},
                save_steps: 1000, logging_steps: 1, per_device_train_batch_size: 2, max_length: 128,
                gradient_checkpointing: false}}
    """))
    out = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "local", "--wait"],
                         env=env_for(root), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"SFT run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    run_dir = Path(out.stdout.split("run dir: ")[1].split()[0])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("tokens_per_s") and x.get("step", 0) > 5]
    step_s = [b["time"] - a["time"] for a, b in zip(train, train[1:], strict=False) if b["step"] == a["step"] + 1]
    return statistics.median(x["tokens_per_s"] for x in train), statistics.median(step_s)


def step_cost_s(root: Path, steps: int = 20_000) -> float:
    """Seconds the watchdog adds to one training step on the rank (the callback's calls, the file writes)."""
    os.environ.update({"HPCQWEN_WATCHDOG": "1", "HPCQWEN_HEARTBEAT_INTERVAL_S": "1", "RANK": "0",
                       "HPCQWEN_NODE_NAME": "bench", "HPCQWEN_JOB_ID": "bench"})
    from types import SimpleNamespace

    from hpcqwen import heartbeat
    from hpcqwen.runners.callbacks import HeartbeatCallback

    heartbeat.start_rank(root / "cost")
    cb = HeartbeatCallback("eval")
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_save=False, should_evaluate=False)
    t0 = time.perf_counter()
    for i in range(steps):
        cb._before_forward(None, ())
        cb._after_forward(None, (), None)
        cb.on_pre_optimizer_step(None, state, control)
        state.global_step = i
        cb.on_step_end(None, state, control)
    return (time.perf_counter() - t0) / steps


def overhead(root: Path, repeats: int, steps: int) -> tuple[list[float], list[float], list[float]]:
    """tokens/s with the watchdog on and off, interleaved, and the off runs' step seconds."""
    model = root / "qwen3-tiny"
    subprocess.run([sys.executable, "-m", "hpcqwen.testing", "tiny-qwen3", str(model)], env=env_for(root),
                   check=True, capture_output=True, timeout=600)
    on, off, step_s = [], [], []
    for i in range(repeats):
        on.append(sft_run(root, model, steps, True, i)[0])
        rate, seconds = sft_run(root, model, steps, False, i)
        off.append(rate)
        step_s.append(seconds)
        print(f"  repeat {i + 1}: on {on[-1]:.1f} tokens/s, off {off[-1]:.1f} tokens/s", flush=True)
    return on, off, step_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_hang(root: Path, n: int) -> float:
    """Two launchers here, rank 1 hangs at step 20; the detection latency in seconds."""
    from hpcqwen.spec import load_spec

    spec = root / "beating.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: wdbench-hang
        resources: {{nodes: 2, nproc_per_node: 1}}
        watchdog: {{hang_timeout_s: {HANG_S}, startup_timeout_s: 60, save_timeout_s: 60, poll_interval_s: {POLL_S}}}
        task: {{kind: command, module: hpcqwen.examples.beating, args: ['--steps', '100000']}}
    """))
    run_dir = root / f"hang-{n}"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(load_spec(spec).model_dump_json())
    hosts = ["localhost", "127.0.0.1"]
    env = {**env_for(root), "SLURM_JOB_ID": "", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": ",".join(hosts),
           "HPCQWEN_MASTER_PORT": str(free_port()), "HPCQWEN_TEST_FAULT": "hang:rank=1:step=20"}
    procs = [subprocess.Popen([sys.executable, "-m", "hpcqwen", "launch", str(run_dir)],
                              env={**env, "SLURM_NODEID": str(i), "SLURMD_NODENAME": hosts[i]},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (0, 1)]
    for p in procs:
        p.wait(timeout=180)
    hang = json.loads((run_dir / ".fault-hang-1.json").read_text())["wall"]
    detected = json.loads(next((run_dir / "hangs").glob("*/verdict.json")).read_text())["detected_wall"]
    return float(detected) - float(hang)


def main() -> None:
    """Run both measurements and print the table rows."""
    p = argparse.ArgumentParser()
    p.add_argument("--ci", action="store_true", help="1 repeat of 20 steps, 2 hangs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hangs", type=int, default=10)
    args = p.parse_args()
    repeats, steps, hangs = (1, 20, 2) if args.ci else (args.repeats, 60, args.hangs)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="wdbench-") as tmp:
        root = Path(tmp)
        t0 = time.time()
        on, off, step_s = overhead(root, repeats, steps)
        ratio = statistics.median(on) / statistics.median(off)
        cost = step_cost_s(root)
        latencies = [one_hang(root, i) for i in range(hangs)]
        print(json.dumps({"tokens_per_s_on": on, "tokens_per_s_off": off, "on_over_off": round(ratio, 4),
                          "step_s_off": round(statistics.median(step_s), 4), "watchdog_s_per_step": round(cost, 7),
                          "watchdog_share_of_step": round(cost / statistics.median(step_s), 6),
                          "latencies_s": [round(x, 2) for x in latencies],
                          "latency_median_s": round(statistics.median(latencies), 2),
                          "latency_max_s": round(max(latencies), 2), "bound_s": HANG_S + POLL_S,
                          "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
