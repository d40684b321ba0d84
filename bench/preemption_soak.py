"""Preemption soak on the real local Slurm cluster: every way Slurm stops a job, over real workloads.

    .venv/bin/python bench/preemption_soak.py [--events 24] [--seed 0] [--workloads sft,grpo,distill,command]

Workloads (tiny random Qwen3, CPU, partition `low` of cluster/local/up): a 2-node LoRA SFT, a GRPO
run, a 3-task distillation array, and a `command` job (hpcqwen.examples.steps). Each gets its share
of a seeded mixed sequence of events, one at a time while the job runs and has made progress:
- `preempt`: a job in partition `high` that needs both nodes (`--exclusive`): SIGTERM to every process
  of the low job's step, GraceTime 60 s, then the batch script requeues itself;
- `term`: `scancel --signal=TERM JOB` (what a site's drain script or a user sends);
- `usr2`: `scancel --batch --signal=USR2 JOB`: the time-limit signal exactly as `--signal=B:USR2@lead`
  delivers it (to the batch shell only), without waiting out a time limit (tests/slurm/test_core.py
  runs the real time-limit path);
- `requeue`: `scontrol requeue JOB` (Slurm kills and requeues the job itself);
- `kill9`: `kill -9` of one rank while it is inside a checkpoint save (the workload runs with the
  test hook HPCQWEN_TEST_SAVE_PAUSE_S, a pause before the marker); the half-written checkpoint must
  be ignored, the crash requeued (`requeue.on_failure`) and resumed from the previous complete one;
- `node_down`: the job's first node set DOWN, then back (Slurm requeues the job after the node failure).
Per workload it prints: events survived (final state COMPLETED with every step done), steps lost
beyond the last save (the resume started from an older checkpoint than the newest complete one;
must be 0), steps redone after the event (the last step the attempt logged minus the step the
next attempt resumed from: 0 for the signal events, which save on the stop), duplicated steps in
metrics.jsonl (0), final step = max_steps, the final loss against an uninterrupted run of the same
spec, and the seconds each event cost (event -> the run is past the step it had at the event).
The figures go to bench/RESULTS.md; tests/slurm/test_soak.py
runs a CI-sized version (`run_soak`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobspecs" / "data"
EVENTS = ("preempt", "term", "usr2", "requeue", "kill9", "node_down")
SIGNAL_EVENTS = ("preempt", "term", "usr2", "requeue")  # the ranks save on these: nothing is redone


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check).stdout


def read_jsonl(path: Path) -> list[dict[str, object]]:
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


@dataclass
class Workload:
    """One job of the soak and how to read its progress from its run dir."""

    name: str
    kind: str  # sft | grpo | distill | command
    spec: str  # YAML text
    total: int  # steps (prompts for distill)
    nodes: int = 1
    events: list[str] = field(default_factory=list)

    def step(self, run_dir: Path) -> int:
        """The newest step done (distill: prompts written)."""
        if self.kind == "command":
            data = read_jsonl(run_dir / "progress.json")
            return int(data[0]["step"]) if data else 0  # type: ignore[call-overload]
        if self.kind == "distill":
            return sum(len(read_jsonl(p)) for p in (run_dir / "shards").glob("shard-*.jsonl"))
        steps = [int(m["step"]) for m in read_jsonl(run_dir / "metrics.jsonl")  # type: ignore[call-overload]
                 if m.get("phase") == "train" and "loss" in m]
        return max(steps, default=0)

    def saved(self, run_dir: Path) -> int:
        """The newest step whose state is durable (a complete checkpoint; every step for the others)."""
        if self.kind in ("command", "distill"):
            return self.step(run_dir)
        from hpcqwen.checkpoints import latest_complete, step_of

        latest = latest_complete(run_dir / "checkpoints")
        return (step_of(latest) or 0) if latest else 0

    def ranks(self, run_dir: Path) -> list[int]:
        """pids of this run's rank processes (on this machine: every fake node is local)."""
        module = f"hpcqwen.runners.{self.kind}"
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if module in args and str(run_dir) in args:
                    pids.append(int(proc.name))
        return pids


def tiny_model(root: Path) -> Path:
    out = root / "qwen3-tiny"
    if not (out / "config.json").exists():
        sh(sys.executable, "-m", "hpcqwen.testing", "tiny-qwen3", str(out))
    return out


def workloads(model: Path, scale: float) -> dict[str, Workload]:
    """The four workloads; `scale` < 1 shortens them for CI."""
    sft_steps, grpo_steps, prompts, cmd_steps = (int(60 * scale), int(24 * scale), 36, int(120 * scale))
    common = "requeue: {max_restarts: 50, signal_lead_s: 60}\n"
    return {
        "sft": Workload("soak-sft", "sft", f"""name: soak-sft
resources: {{nodes: 2, nproc_per_node: 1, time_limit_min: 60, partition: low}}
env: {{HPCQWEN_TEST_SAVE_PAUSE_S: "3"}}
{common}task:
  kind: sft
  model: {model}
  dataset: [{DATA}/sft-tiny.jsonl]
  torch_dtype: float32
  max_steps: {sft_steps}
  save_steps: 5
  logging_steps: 1
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 2
  learning_rate: 5e-3
  lora_dropout: 0.1
  max_length: 256
  gradient_checkpointing: false
""", sft_steps, nodes=2),
        "grpo": Workload("soak-grpo", "grpo", f"""name: soak-grpo
resources: {{nodes: 1, nproc_per_node: 1, time_limit_min: 60, partition: low}}
env: {{HPCQWEN_TEST_SAVE_PAUSE_S: "3"}}
{common}task:
  kind: grpo
  model: {model}
  train_type: full
  torch_dtype: float32
  dataset: {DATA}/math-tiny.jsonl
  reward_funcs: [accuracy, {REPO}/jobspecs/plugins/example_reward.py:brevity]
  num_generations: 4
  per_device_train_batch_size: 4
  max_steps: {grpo_steps}
  learning_rate: 1e-3
  max_length: 256
  max_completion_length: 16
  enable_thinking: false
  gradient_checkpointing: false
  save_steps: 2
  logging_steps: 1
""", grpo_steps),
        "distill": Workload("soak-distill", "distill", f"""name: soak-distill
resources: {{time_limit_min: 60, partition: low}}
{common}task:
  kind: distill
  model: {model}
  infer_backend: hf
  torch_dtype: float32
  dataset: {DATA}/sft-tiny.jsonl#{prompts}
  enable_thinking: false
  max_new_tokens: 48
  max_model_len: 512
  num_return_sequences: 1
  write_batch_size: 1
  shards: 3
""", prompts),
        "command": Workload("soak-cmd", "command", f"""name: soak-cmd
resources: {{time_limit_min: 60, partition: low}}
{common}task: {{kind: command, module: hpcqwen.examples.steps, args: [--steps, '{cmd_steps}', --step-seconds, '0.5']}}
""", cmd_steps),
    }


def submit(spec: Path, env: dict[str, str], *sets: str) -> tuple[str, Path]:
    out = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "slurm",
                          *[f"--set={s}" for s in sets]], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    line = next(x for x in out.stdout.splitlines() if x.startswith("submitted job "))
    job, run_dir = line.removeprefix("submitted job ").split("  run dir: ")
    return job, Path(run_dir)


def states(job: str) -> list[str]:
    out = sh("squeue", "--noheader", "--array", "--states=all", "-o", "%T", f"--jobs={job}", check=False)
    return [x.strip() for x in out.splitlines() if x.strip()]


def hpcqwen_state(run_dir: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "hpcqwen", "status", str(run_dir), "--json"], capture_output=True,
                         text=True, env=env)
    with contextlib.suppress(ValueError):
        return [t["state"] for t in json.loads(out.stdout)["tasks"]]
    return []


def wait(pred, timeout: float, what: str, every: float = 0.5):  # noqa: ANN001, ANN201
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def nodes_of(job: str) -> list[str]:
    text = sh("squeue", "--noheader", "-o", "%N", f"--jobs={job}", check=False).strip().splitlines()
    if not text or not text[0].strip():
        return []
    return sh("scontrol", "show", "hostnames", text[0].strip()).split()


@dataclass
class EventRecord:
    kind: str
    step_at: int  # step done when the event came
    saved_at: int  # newest durable step then
    step_hit: int = 0  # step done right after the event was injected (a kill waits for a save first)
    seconds: float = float("nan")  # until the run was past step_at again


def apply(event: str, w: Workload, job: str, run_dir: Path) -> None:
    """Inject one event into the running job."""
    if event == "preempt":  # a high job that needs exactly the nodes the low job holds
        nodes = nodes_of(job)
        sh("sbatch", "--parsable", "-p", "high", f"-N{len(nodes)}", f"--nodelist={','.join(nodes)}", "--exclusive",
           "-J", "soak-preemptor", "-o", "/dev/null", "--wrap", "sleep 2")
    elif event == "term":
        sh("scancel", "--signal=TERM", job)
    elif event == "usr2":
        sh("scancel", "--batch", "--signal=USR2", job)
    elif event == "requeue":
        sh("scontrol", "requeue", job)
    elif event == "kill9":
        wait(lambda: any(not (p / "hpcqwen-complete.json").exists()
                         for p in (run_dir / "checkpoints").glob("checkpoint-*")), 300, "a save in progress", 0.05)
        pids = w.ranks(run_dir)
        os.kill(pids[-1], 9)
    elif event == "node_down":
        node = nodes_of(job)[0]
        sh("scontrol", "update", f"nodename={node}", "state=down", "reason=soak")
        time.sleep(8)
        # ReturnToService=2 (cluster/local/up) may have brought it back already when its slurmd re-registered
        sh("scontrol", "update", f"nodename={node}", "state=resume", check=False)


def running(job: str) -> bool:
    return bool(states(job)) and all(s == "RUNNING" for s in states(job))


def soak_one(w: Workload, root: Path, env: dict[str, str], log: list[str]) -> dict[str, object]:
    """Run one workload through its events; returns its row of the table."""
    spec = root / f"{w.name}.yaml"
    spec.write_text(w.spec)
    job, run_dir = submit(spec, env)
    records: list[EventRecord] = []
    last = 0
    for event in w.events:
        wait(lambda: running(job) and w.step(run_dir) >= last + 1 and w.step(run_dir) < w.total - 3, 900,
             f"{w.name} to run and progress before {event}")
        if event == "kill9" and w.kind not in ("sft", "grpo"):
            event = "term"
        rec = EventRecord(event, w.step(run_dir), w.saved(run_dir))
        t0 = time.time()
        apply(event, w, job, run_dir)
        rec.step_hit = max(rec.step_at, w.step(run_dir))
        log.append(f"{dt.datetime.now():%H:%M:%S} {w.name}: {event} at step {rec.step_at} (saved {rec.saved_at})")
        wait(lambda: w.step(run_dir) > rec.step_at or set(states(job)) <= {"COMPLETED", "FAILED", "CANCELLED"},
             900, f"{w.name} to get past step {rec.step_at} after {event}")
        rec.seconds = time.time() - t0
        records.append(rec)
        last = w.step(run_dir)
    wait(lambda: states(job) and set(states(job)) <= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 1800,
         f"{w.name} to end")
    time.sleep(2)
    return {"workload": w, "job": job, "run_dir": run_dir, "records": records,
            "state": hpcqwen_state(run_dir, env)}


def resumes(w: Workload, run_dir: Path) -> list[tuple[int, int]]:
    """(resumed-from step, newest complete checkpoint step when that attempt started) per restart."""
    if w.kind not in ("sft", "grpo"):
        return []
    from hpcqwen.checkpoints import list_checkpoints, read_marker, step_of

    text = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out"))
    resumed = [int(line.rsplit("checkpoint-", 1)[1]) for line in text.splitlines()
               if line.startswith(f"{w.kind}: resuming from ")]
    starts = [dt.datetime.fromisoformat(str(x["time"])) for x in read_jsonl(run_dir / "launches.jsonl")][1:]
    markers = [(step_of(p) or 0, dt.datetime.fromisoformat(str(read_marker(p).get("time")))) for p in
               list_checkpoints(run_dir / "checkpoints") if read_marker(p).get("time")]
    out = []
    for r, start in zip(resumed, starts, strict=False):
        newest = max((s for s, t in markers if t <= start), default=r)  # pruned ones are older anyway
        out.append((r, newest))
    return out


def redone_per_restart(w: Workload, run_dir: Path, recs: list[EventRecord]) -> list[int] | None:
    """Steps trained again after each event: the step done when it hit minus the step the next attempt
    resumed from (0 when it found no complete checkpoint); None where the runner logs no resumes."""
    if w.kind not in ("sft", "grpo"):
        return None
    text = "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))
    resumed: dict[int, int] = {}
    attempt = 0
    for line in text.splitlines():
        m = re.search(r" launch: spec sha256 \S+ job \S+ restart (\d+) node 0/", line)
        if m:
            attempt = int(m.group(1))
            resumed.setdefault(attempt, 0)
        elif line.startswith(f"{w.kind}: resuming from "):
            resumed[attempt] = int(line.rsplit("checkpoint-", 1)[1])
    return [max(0, rec.step_hit - resumed.get(i + 1, rec.step_hit)) for i, rec in enumerate(recs)]


def summarize(result: dict[str, object], reference: dict[str, object] | None) -> dict[str, object]:
    w: Workload = result["workload"]  # type: ignore[assignment]
    run_dir: Path = result["run_dir"]  # type: ignore[assignment]
    recs: list[EventRecord] = result["records"]  # type: ignore[assignment]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train = [m["step"] for m in metrics if m.get("phase") == "train" and "loss" in m]
    dup = sum(c - 1 for c in collections.Counter(train).values() if c > 1)
    if w.kind == "distill":
        ids = [(p.name, r["id"]) for p in (run_dir / "shards").glob("shard-*.jsonl") for r in read_jsonl(p)]
        dup = len(ids) - len(set(ids))
    lost = sum(max(0, newest - r) for r, newest in resumes(w, run_dir))
    measured = redone_per_restart(w, run_dir, recs)
    redone = ([measured[i] if i < len(measured) else 0 for i in range(len(recs))] if measured is not None
              else [max(0, rec.step_at - rec.saved_at) for rec in recs])  # no resume log: the distance to a save
    final_loss = next((m["loss"] for m in reversed(metrics) if "loss" in m), None)
    ref_loss = None
    if reference is not None:
        ref_metrics = read_jsonl(reference["run_dir"] / "metrics.jsonl")  # type: ignore[operator]
        ref_loss = next((m["loss"] for m in reversed(ref_metrics) if "loss" in m), None)
    return {"workload": w.name, "events": ", ".join(r.kind for r in recs), "survived": sum(
        1 for _ in recs) if result["state"] and set(result["state"]) == {"COMPLETED"} else 0,  # type: ignore[arg-type]
        "n_events": len(recs), "lost_beyond_save": lost,
        "redone_after_signal": sum(d for d, r in zip(redone, recs, strict=True) if r.kind in SIGNAL_EVENTS),
        "redone_after_crash": sum(d for d, r in zip(redone, recs, strict=True) if r.kind not in SIGNAL_EVENTS),
        "duplicates": dup, "final_step": w.step(run_dir), "total": w.total, "final_loss": final_loss,
        "reference_loss": ref_loss, "seconds": {r.kind: round(r.seconds, 1) for r in recs},
        "seconds_by_event": [(r.kind, round(r.seconds, 1)) for r in recs], "state": ",".join(result["state"])}  # type: ignore[arg-type]


def run_soak(names: list[str], n_events: int, seed: int, scale: float, root: Path,
             log: list[str] | None = None) -> list[dict[str, object]]:
    """Submit each workload, inject its share of `n_events` events, summarize. Returns the rows."""
    log = log if log is not None else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HPCQWEN_RUN_ROOT": str(root)}
    model = tiny_model(root)
    table = workloads(model, scale)
    chosen = [table[n] for n in names]
    rng = random.Random(seed)
    sequence = [EVENTS[i % len(EVENTS)] for i in range(n_events)]
    rng.shuffle(sequence)
    for i, event in enumerate(sequence):
        chosen[i % len(chosen)].events.append(event)
    rows = []
    for w in chosen:
        reference = None
        if w.kind in ("sft", "grpo"):  # the same spec without events, in the never-preempted partition
            spec = root / f"{w.name}-ref.yaml"
            spec.write_text(w.spec.replace(f"name: {w.name}", f"name: {w.name}-ref").replace("partition: low",
                                                                                              "partition: debug"))
            job, run_dir = submit(spec, env)
            wait(lambda job=job: states(job) and set(states(job)) <= {"COMPLETED", "FAILED"}, 1800, "the reference")
            reference = {"run_dir": run_dir}
        rows.append(summarize(soak_one(w, root, env, log), reference))
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    head = ("workload", "events survived", "lost beyond save", "redone (signal / crash)", "duplicates",
            "final step", "final loss (uninterrupted)", "median s per event (max)", "final state")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        secs = [s for _, s in r["seconds_by_event"]]  # type: ignore[union-attr]
        loss = "–" if r["final_loss"] is None else f"{r['final_loss']:.6f} ({r['reference_loss']})"
        print(f"| {r['workload']} | {r['survived']}/{r['n_events']} ({r['events']}) | {r['lost_beyond_save']} | "
              f"{r['redone_after_signal']} / {r['redone_after_crash']} | {r['duplicates']} | "
              f"{r['final_step']}/{r['total']} | {loss} | "
              f"{statistics.median(secs) if secs else 0:.0f} ({max(secs, default=0):.0f}) | {r['state']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", default="sft,grpo,distill,command")
    p.add_argument("--scale", type=float, default=1.0, help="shorten the workloads (CI uses less than 1)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hpcqwen-soak-"))
    log: list[str] = []
    t0 = time.time()
    rows = run_soak(args.workloads.split(","), args.events, args.seed, args.scale, root, log)
    print("\n".join(log))
    print(f"\nsoak: {args.events} events, seed {args.seed}, {time.time() - t0:.0f} s, runs under {root}\n")
    print_table(rows)
    for r in rows:
        print(r["workload"], json.dumps(r["seconds_by_event"]))


if __name__ == "__main__":
    main()
