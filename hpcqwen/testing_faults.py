"""TEST-ONLY fault hooks: hangs, slow ranks, late launchers, slow saves — never a spec knob.

Imported by the runners' helpers and the launcher only when one of these variables is set (the test
sets it in the submitting shell; Slurm exports it to the job):
- `HPCQWEN_TEST_FAULT`: faults separated by `;`, each `kind:key=value:...`, e.g.
  `hang:rank=1:step=5` (rank 1 sleeps for ever at the end of step 5, before the step's collectives),
  `slow:rank=1:factor=3` (rank 1's forward passes take 3× as long), `launch_delay:node=1:seconds=90`
  (node 1's launcher waits before it does anything). `restart=N` limits a fault to that attempt
  (default: hang and launch_delay only on restart 0, so the requeued attempt runs clean; slow always).
- `HPCQWEN_TEST_SAVE_PAUSE_S`: seconds every checkpoint save pauses before its marker (the preemption soak
  kills a rank there; the watchdog tests prove that a long save is not a hang).
A hang writes `TASK_DIR/.fault-hang-<rank>.json` (wall time, step) so a test can measure detection latency.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcqwen.supervisor import early_signal

FAULT_ENV = "HPCQWEN_TEST_FAULT"
SAVE_PAUSE_ENV = "HPCQWEN_TEST_SAVE_PAUSE_S"
ONCE_BY_DEFAULT = {"hang", "launch_delay"}


@dataclass(frozen=True)
class Fault:
    """One parsed fault."""

    kind: str
    args: dict[str, str] = field(default_factory=dict)

    def number(self, key: str, default: float) -> float:
        """A numeric argument."""
        return float(self.args.get(key, default))

    def applies(self, restart: int, **who: int) -> bool:
        """This fault targets `who` (rank=…, node=…) on this attempt."""
        if "restart" in self.args:
            if int(self.args["restart"]) != restart:
                return False
        elif self.kind in ONCE_BY_DEFAULT and restart != 0:
            return False
        return all(key not in self.args or int(self.args[key]) == value for key, value in who.items())


def active() -> bool:
    """Any test fault is configured (the callers import this module only then)."""
    return bool(os.environ.get(FAULT_ENV) or os.environ.get(SAVE_PAUSE_ENV))


def faults(text: str | None = None) -> list[Fault]:
    """The faults of HPCQWEN_TEST_FAULT (or `text`)."""
    out = []
    for item in (text if text is not None else os.environ.get(FAULT_ENV, "")).split(";"):
        kind, *pairs = item.strip().split(":")
        if kind:
            out.append(Fault(kind, dict(p.split("=", 1) for p in pairs if "=" in p)))
    return out


def _restart() -> int:
    return int(os.environ.get("HPCQWEN_RESTART_COUNT", "0") or 0)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def sleep_forever(step: int) -> None:
    """The hang: this rank stops making progress (and joins no collective) until it is killed."""
    task_dir = Path(os.environ.get("HPCQWEN_TASK_DIR", "."))
    marker = task_dir / f".fault-hang-{_rank()}.json"
    marker.write_text(json.dumps({"wall": time.time(), "step": step, "rank": _rank()}))
    print(f"hpcqwen TEST FAULT: rank {_rank()} hangs at step {step}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def maybe_hang(step: int) -> None:
    """Hang here when a `hang` fault names this rank and step."""
    for f in faults():
        if f.kind == "hang" and f.applies(_restart(), rank=_rank(), step=step):
            sleep_forever(step)


def slow_factor() -> float:
    """How many times slower this rank's forward passes must be (1.0: not slowed)."""
    for f in faults():
        if f.kind == "slow" and f.applies(_restart(), rank=_rank()):
            return f.number("factor", 3.0)
    return 1.0


def launch_delay(node_rank: int, restart: int) -> None:
    """Hold this node's launcher back (a node that does not start its launcher in time)."""
    for f in faults():
        if f.kind == "launch_delay" and f.applies(restart, node=node_rank):
            seconds = f.number("seconds", 3600)
            print(f"hpcqwen TEST FAULT: node {node_rank}'s launcher waits {seconds:g} s", file=sys.stderr, flush=True)
            end = time.monotonic() + seconds
            while time.monotonic() < end and early_signal() is None:  # a stop request ends the wait
                time.sleep(0.2)


def save_pause_s() -> float:
    """Seconds every save pauses before its marker (HPCQWEN_TEST_SAVE_PAUSE_S)."""
    return float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)
