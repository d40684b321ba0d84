"""The hang and straggler watchdog: node 0's launcher watches every rank's heartbeat and acts on a hang.

A `Watcher` thread in node 0's launcher (node 0 already holds the task lease and writes OUTCOME) reads
`TASK_DIR/heartbeats/*.json` every `poll_interval_s` and notes, on its own monotonic clock, when each
rank's file last changed (`Tracker`; never the remote timestamps, so clock skew does not matter).
- stuck start: some rank has not reached a training phase `startup_timeout_s` after the launcher started;
- hang: a rank in a training phase made no progress for `hang_timeout_s` (`save_timeout_s` in `save`);
- straggler: a rank's mean forward time per step is `straggler_ratio` × the median of the other ranks'
  (one `metrics.jsonl` line when it starts; no action).
On a hang it asks every node's launcher for its ranks' stacks (`hpcqwen.stacks`), writes
`hangs/<UTC time>/report.md` (`hpcqwen.hangreport`), then acts per `on_hang` (`act`): requeue (through
the same restart count as the batch script; with the suspect node excluded by a helper job while the
requeued job is held, since Slurm refuses ExcNodeList for a running job), cancel, or only report. Its
latest view goes to `TASK_DIR/WATCHDOG.json` for `hpcqwen queue` (STALLED, stragglers, the report).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcqwen import fs, heartbeat, stacks
from hpcqwen.hangreport import RankInfo, render, suspect_nodes, suspects
from hpcqwen.metrics import MetricsWriter
from hpcqwen.paths import TaskPaths
from hpcqwen.watchconfig import Layout, Verdict, WatchConfig

EXIT_HUNG = 124  # the launcher's exit code after the watchdog ended the attempt (as timeout(1) does)


class Tracker:
    """When each rank last made progress, on the watcher's clock: a change seen at a poll was written after the
    previous poll, and the beat it reports came `lag_s` (the writer's own clock) before that write; so the
    previous poll's time minus the lag is used, and detection comes at most one poll after the allowance."""

    def __init__(self) -> None:
        self.sig: dict[int, tuple[Any, ...]] = {}
        self.changed: dict[int, float] = {}
        self.prev_poll: float | None = None

    def update(self, beats: dict[int, dict[str, Any]], now: float) -> None:
        """Note this poll's heartbeats."""
        for rank, b in beats.items():
            sig = (b.get("pid"), b.get("source"), b.get("beats"), b.get("step"), b.get("phase"))
            if self.sig.get(rank) != sig:
                self.sig[rank] = sig
                lag = b.get("lag_s")
                lag_s = min(float(lag), 3600.0) if isinstance(lag, (int, float)) and lag > 0 else 0.0
                self.changed[rank] = (self.prev_poll if self.prev_poll is not None else now) - lag_s
        self.prev_poll = now

    def age(self, rank: int, now: float) -> float | None:
        """Seconds since the rank's heartbeat last changed (None: never seen)."""
        return now - self.changed[rank] if rank in self.changed else None


def started(b: dict[str, Any] | None) -> bool:
    """The rank reached a training phase."""
    return b is not None and b.get("source") == "rank" and b.get("phase") not in heartbeat.STARTUP_PHASES


def assess(tracker: Tracker, beats: dict[int, dict[str, Any]], layout: Layout, cfg: WatchConfig, since: float,
           now: float) -> Verdict | None:
    """Pure: the verdict of one poll (`since`: when the launcher started, on the same clock)."""
    waiting = [r for r in range(layout.world) if not started(beats.get(r))]
    if waiting and not cfg.runner_beats:  # a module that does not beat is not watched (until it beats)
        waiting = []
    if waiting:
        if now - since < cfg.startup_timeout_s:
            return None
        return Verdict("stuck start", tuple(waiting), f"rank(s) {', '.join(map(str, waiting))} did not reach "
                       f"their first step within startup_timeout_s ({cfg.startup_timeout_s:g} s)")
    stale = []
    for r in range(layout.world):
        age, b = tracker.age(r, now), beats.get(r)
        if age is None or b is None or not started(b) or b.get("phase") == heartbeat.EXITED:
            continue
        if age >= cfg.allowance(str(b.get("phase"))):
            stale.append(r)
    if not stale:
        return None
    phases = sorted({str(beats[r].get("phase")) for r in stale})
    longest = max(cfg.allowance(p) for p in phases)
    return Verdict("hang", tuple(stale), f"no progress on rank(s) {', '.join(map(str, stale))} for "
                   f"{longest:g} s (phase {', '.join(phases)})")


def stragglers(beats: dict[int, dict[str, Any]], ratio: float | None) -> list[dict[str, Any]]:
    """Ranks whose mean forward time per step is `ratio` × the median of the other ranks' (pure)."""
    work = {r: float(b["work_s"]) for r, b in beats.items() if isinstance(b.get("work_s"), (int, float))}
    out = []
    for r, w in sorted(work.items()):
        others = [v for k, v in work.items() if k != r]
        med = statistics.median(others) if others else 0.0
        if ratio and med > 0 and w / med >= ratio:
            out.append({"rank": r, "host": beats[r].get("host"), "step": beats[r].get("step"), "work_s": round(w, 4),
                        "median_s": round(med, 4), "ratio": round(w / med, 2)})
    return out


def rank_infos(beats: dict[int, dict[str, Any]], tracker: Tracker, layout: Layout, now: float) -> list[RankInfo]:
    """The report's view of every rank (before stacks)."""
    out = []
    for r in range(layout.world):
        b = beats.get(r)
        out.append(RankInfo(r, str(b.get("host")) if b else layout.host_of(r), b.get("step") if b else None,
                            str(b.get("phase", "")) if b else "", tracker.age(r, now), b.get("pid") if b else None))
    return out


class Watcher(threading.Thread):
    """Node 0's watcher thread (see the module docstring)."""

    def __init__(self, cfg: WatchConfig, layout: Layout, task: TaskPaths, kill_local: Callable[[], None], host: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="hpcqwen-watchdog", daemon=True)
        self.cfg, self.layout, self.task, self.kill_local, self.host, self.clock = cfg, layout, task, kill_local, \
            host, clock
        self.tracker = Tracker()
        self.outcome: str | None = None  # the OUTCOME line the watchdog wrote (the launcher then keeps it)
        self.report: Path | None = None
        self.stopped = threading.Event()
        self.since = clock()
        self.reported: set[int] = set()
        self.current_stragglers: list[dict[str, Any]] = []
        self.acted = False
        self.detected_wall: float | None = None  # when the verdict came (for the benchmark's latency)
        self.dump_wait_s = min(90.0, 3 * cfg.poll_s + 30.0)  # py-spy on many ranks of a loaded node takes a while

    def run(self) -> None:
        while not self.stopped.wait(self.cfg.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the watcher must never take the launcher down
                print(f"hpcqwen watchdog: poll failed: {type(e).__name__}: {e}", flush=True)
            if self.acted and self.cfg.on_hang != "report":
                return

    def poll(self) -> Verdict | None:
        """One look: heartbeats, the status file, stragglers, and the verdict (acted on here)."""
        now = self.clock()
        beats = heartbeat.read_all(self.task.heartbeats, self.layout.job_id, self.layout.restart)
        self.tracker.update(beats, now)
        verdict = assess(self.tracker, beats, self.layout, self.cfg, self.since, now)
        self.note_stragglers(beats)
        self.write_status(beats, now, verdict)
        if verdict is not None and not self.acted:
            self.acted = True
            self.on_verdict(verdict, beats, now)
        elif verdict is None and self.cfg.on_hang == "report":
            self.acted = False  # progress again: a later hang is reported again
        return verdict

    def note_stragglers(self, beats: dict[int, dict[str, Any]]) -> None:
        """One metrics.jsonl line when a rank starts to straggle (node 0 is rank 0's node: one writer)."""
        found = stragglers(beats, self.cfg.straggler_ratio)
        for s in found:
            if s["rank"] not in self.reported:
                MetricsWriter(self.task.metrics).write({"step": s["step"], "event": "straggler", **s})
                print(f"hpcqwen watchdog: straggler: rank {s['rank']} on {s['host']} takes {s['ratio']}x the median "
                      f"forward time of the other ranks ({s['work_s']} s vs {s['median_s']} s per step)", flush=True)
        self.reported = {s["rank"] for s in found}
        self.current_stragglers = found

    def write_status(self, beats: dict[int, dict[str, Any]], now: float, verdict: Verdict | None) -> None:
        """WATCHDOG.json: the watcher's latest view (the monitor reads it)."""
        ranks = rank_infos(beats, self.tracker, self.layout, now)
        aged = [r for r in ranks if r.age_s is not None and started(beats.get(r.rank))]
        oldest = max(aged, key=lambda r: r.age_s or 0.0, default=None)
        fs.write_json_atomic(self.task.watchdog, {
            "job_id": self.layout.job_id, "restart": self.layout.restart, "watcher": self.host,
            "poll_s": self.cfg.poll_s, "started": not any(not started(beats.get(r.rank)) for r in ranks),
            "oldest": None if oldest is None else {"rank": oldest.rank, "host": oldest.host, "step": oldest.step,
                                                    "phase": oldest.phase, "age_s": round(oldest.age_s or 0, 1),
                                                    "allowance_s": self.cfg.allowance(oldest.phase)},
            "stragglers": self.current_stragglers, "verdict": verdict.detail if verdict else None,
            "report": str(self.report) if self.report else None, "detected_wall": self.detected_wall}, durable=False)

    def resolved(self) -> bool:
        """Look once more after the dumps: a rank that moved meanwhile was slow, not hung (no report, no action;
        e.g. a start that reached its first step while the stacks were taken)."""
        now = self.clock()
        beats = heartbeat.read_all(self.task.heartbeats, self.layout.job_id, self.layout.restart)
        self.tracker.update(beats, now)
        if assess(self.tracker, beats, self.layout, self.cfg, self.since, now) is not None:
            return False
        print("hpcqwen watchdog: the ranks moved on while their stacks were taken: no hang, no action", flush=True)
        self.acted = False
        return True

    def on_verdict(self, verdict: Verdict, beats: dict[int, dict[str, Any]], now: float) -> None:
        """Stacks of every rank, the report, then the action."""
        self.detected_wall = time.time()
        print(f"hpcqwen watchdog: {verdict.kind}: {verdict.detail}; dumping the stacks of every rank", flush=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = self.task.hangs / stamp
        out.mkdir(parents=True, exist_ok=True)
        fs.write_json_atomic(out / "verdict.json", {"kind": verdict.kind, "ranks": list(verdict.ranks),
                                                    "detail": verdict.detail, "detected_wall": self.detected_wall,
                                                    "job_id": self.layout.job_id, "restart": self.layout.restart})
        answered = request_dumps(self.task.hangs, stamp, self.layout, self.dump_wait_s)
        if self.resolved():
            shutil.rmtree(out, ignore_errors=True)  # no hang after all: no report to list
            return
        ranks = [with_stack(r, out) for r in rank_infos(beats, self.tracker, self.layout, now)]
        found, why = suspects(ranks, answered)
        bad = suspect_nodes(found, ranks) if self.cfg.exclude_bad_node else []
        self.report = out / "report.md"
        from hpcqwen import hangaction

        action = hangaction.plan(self.cfg, self.layout, bad)
        headline = f"job {self.layout.slurm_job or self.layout.job_id}, restart {self.layout.restart}: {verdict.detail}"
        fs.write_atomic(self.report, render(verdict.kind, headline, ranks, found, why, action.describe(),
                                            f"by the watchdog on {self.host} at {stamp}"))
        print(f"hpcqwen watchdog: report {self.report}; {action.describe()}", flush=True)
        self.write_status(beats, now, verdict)
        self.outcome = hangaction.carry_out(action, self.task, self.layout, verdict, self.report, self.kill_local)


def request_dumps(hangs: Path, stamp: str, layout: Layout, wait_s: float) -> set[str]:
    """Ask every node's launcher for its ranks' stacks; wait up to `wait_s` for their answers; who answered."""
    fs.write_json_atomic(hangs / stacks.REQUEST, {"id": stamp, "job_id": layout.job_id, "restart": layout.restart},
                         durable=False)
    wanted = set(layout.hosts)
    end = time.monotonic() + wait_s
    answered: set[str] = set()
    while time.monotonic() < end and answered != wanted:
        time.sleep(0.2)
        answered = {h for h in wanted if (hangs / stamp / f".done-{h}.json").exists()}
    return answered


def with_stack(r: RankInfo, out: Path) -> RankInfo:
    """The rank's view with what its dump says (where it is, whether in a collective, the tool)."""
    path = out / f"{r.host}-{r.rank}.txt"
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace")
        first, _, body = text.partition("\n")
        where, waiting = stacks.where(stacks.main_thread(body))
        tool = first.split(", by ", 1)[1].rsplit(", ", 1)[0] if ", by " in first else "?"
        return RankInfo(r.rank, r.host, r.step, r.phase, r.age_s, r.pid, where, waiting, tool, path.name)
    return r
