"""Python stacks of this node's ranks, on request of node 0's watcher, and what a stack says.

py-spy attaches only to processes of its own machine, so every node's launcher dumps its own ranks: a
`Responder` thread polls `TASK_DIR/hangs/.request.json` (written by the watcher on node 0) and writes
`<hang dir>/<host>-<rank>.txt` for each local rank, then `.done-<host>.json`. It also polls
`TASK_DIR/hangs/.kill.json`: the watcher's order to kill the ranks of this attempt (no collective can end a
hang, so nothing is saved). The tool is py-spy (`py-spy dump --pid`, from its PyPI wheel; the launcher is the
ranks' parent, so ptrace is allowed even under Yama scope 1); when py-spy is missing or cannot attach,
faulthandler: the rank registered DUMP_SIGNAL (`hpcqwen.heartbeat`), writes all its threads' stacks into its
`.stacks` file from a C signal handler (it works while the rank is blocked in C++, e.g. a gloo wait), and
the launcher copies the new part. Each dump file's first line names the tool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcqwen import fs

REQUEST, KILL = ".request.json", ".kill.json"
HANG_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z(-[0-9]+)?")  # a hang folder's name: UTC time
PY_SPY_TIMEOUT_S = 30.0
# Names of torch.distributed calls (and the autograd engine, where DDP's gradient all-reduce waits) that a
# rank blocked on its peers sits in.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter", "reduce", "send", "recv",
               "init_process_group", "new_group", "_store_based_barrier", "rendezvous", "_engine_run_backward",
               "run_backward")


@dataclass(frozen=True)
class LocalRank:
    """A rank of this node, as its launcher knows it."""

    rank: int
    pid: int
    stacks_file: Path | None  # its faulthandler file, when it registered DUMP_SIGNAL
    dump_signal: int | None


@dataclass(frozen=True)
class Frame:
    """One frame of a stack."""

    func: str
    file: str
    line: int

    def describe(self) -> str:
        """`all_reduce (torch/distributed/distributed_c10d.py:2953)`, with site-packages paths shortened."""
        short = re.sub(r".*/(site-packages|dist-packages|lib/python[0-9.]+)/", "", self.file)
        short = re.sub(r".*/(hpcqwen/)", r"\1", short)
        return f"{self.func} ({short}:{self.line})"


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def py_spy_version(exe: str) -> str:
    """`py-spy 0.4.3`."""
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "py-spy"


def dump_with_py_spy(pid: int) -> tuple[str, str]:
    """(text, tool) of `py-spy dump --pid`; ('', why) when it cannot."""
    exe = py_spy()
    if exe is None:
        return "", "py-spy not installed"
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=PY_SPY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"py-spy failed: {e}"
    if out.returncode != 0 or "Thread" not in out.stdout:
        return "", f"py-spy failed: {(out.stderr or out.stdout).strip().splitlines()[0:1]}"
    return out.stdout, py_spy_version(exe)


def dump_with_faulthandler(r: LocalRank, wait_s: float = 3.0) -> tuple[str, str]:
    """(text, tool) from the rank's faulthandler: signal it, copy what it appended to its stacks file."""
    if r.stacks_file is None or r.dump_signal is None:
        return "", "no faulthandler registered (the rank had not started its heartbeat)"
    try:
        before = r.stacks_file.stat().st_size
        os.kill(r.pid, r.dump_signal)
    except OSError as e:
        return "", f"faulthandler: {e}"
    end = time.monotonic() + wait_s
    size = before
    while time.monotonic() < end:
        time.sleep(0.2)
        new = r.stacks_file.stat().st_size
        if new > before and new == size:  # grown, and stopped growing
            break
        size = new
    with open(r.stacks_file, encoding="utf-8", errors="replace") as f:
        f.seek(before)
        text = f.read()
    return text, f"faulthandler (signal {signal.Signals(r.dump_signal).name if r.dump_signal < 32 else r.dump_signal})"


def dump_rank(r: LocalRank) -> tuple[str, str]:
    """(text, tool): py-spy first, faulthandler when py-spy cannot."""
    text, tool = dump_with_py_spy(r.pid)
    if text:
        return text, tool
    why = tool
    text, tool = dump_with_faulthandler(r)
    return (text, f"{tool}; {why}") if text else (f"no stack: {why}; {tool}\n", "none")


def write_dumps(ranks: list[LocalRank], out_dir: Path, host: str) -> dict[int, str]:
    """Dump each rank into `<out_dir>/<host>-<rank>.txt`; returns the tool used per rank."""
    tools = {}
    for r in ranks:
        text, tool = dump_rank(r)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        header = f"# stacks of rank {r.rank} (pid {r.pid}) on {host}, by {tool}, {when}\n"
        fs.write_atomic(out_dir / f"{host}-{r.rank}.txt", header + text, durable=False)
        tools[r.rank] = tool
    return tools


# ---- reading a dump ------------------------------------------------------------------------------------------

_PY_SPY_FRAME = re.compile(r"^\s+(?P<func>\S.*?) \((?P<file>[^()]*):(?P<line>\d+)\)\s*$")
_FH_FRAME = re.compile(r'^\s+File "(?P<file>[^"]*)", line (?P<line>\d+) in (?P<func>\S+)')


def main_thread(text: str) -> list[Frame]:
    """The main thread's frames, innermost first, from a py-spy or faulthandler dump ([] if none)."""
    threads: list[tuple[str, list[Frame]]] = []
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            threads.append((line, []))
            continue
        m = _PY_SPY_FRAME.match(line) or _FH_FRAME.match(line)
        if m and threads:
            threads[-1][1].append(Frame(m.group("func"), m.group("file"), int(m.group("line"))))
    for head, frames in threads:
        if '"MainThread"' in head:
            return frames
    # faulthandler names no thread: the main thread's outermost frame is the script's <module>
    for _, frames in threads:
        if frames and frames[-1].func == "<module>":
            return frames
    return threads[0][1] if threads else []


def where(frames: list[Frame]) -> tuple[str, bool]:
    """(what the rank is doing, whether it waits in a collective): the collective and its caller, else the
    innermost frame."""
    for i, f in enumerate(frames):
        if f.func in COLLECTIVES:
            caller = next((c for c in frames[i + 1:] if "torch/" not in c.file), None)
            via = f" called from {caller.describe()}" if caller else ""
            return f"in collective {f.describe()}{via}", True
    if not frames:
        return "no stack", False
    return f"in {frames[0].describe()}" + (f" called from {frames[1].describe()}" if len(frames) > 1 else ""), False


# ---- the responder (every launcher) ------------------------------------------------------------------------------

class Responder(threading.Thread):
    """Answers the watcher's dump and kill requests for this node's ranks (a daemon thread of the launcher)."""

    def __init__(self, hangs: Path, host: str, job_id: str, restart: int, ranks: Callable[[], list[LocalRank]],
                 kill: Callable[[], None], poll_s: float) -> None:
        super().__init__(name="hpcqwen-dump-responder", daemon=True)
        self.hangs, self.host, self.job_id, self.restart = hangs, host, job_id, restart
        self.ranks, self.kill, self.poll_s = ranks, kill, poll_s
        self.stopped = threading.Event()
        self.answered: set[str] = set()

    def _mine(self, data: object) -> bool:
        return isinstance(data, dict) and data.get("job_id") == self.job_id and data.get("restart") == self.restart

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            with contextlib.suppress(Exception):  # a monitor thread must never take the launcher down
                self.poll()

    def poll(self) -> None:
        """One look at the request and kill files."""
        request = fs.read_json(self.hangs / REQUEST)
        if self._mine(request) and HANG_ID_RE.fullmatch(str(request.get("id"))) and request["id"] not in self.answered:
            self.answered.add(request["id"])
            out = self.hangs / request["id"]  # never a path from the file: only the id, checked above
            out.mkdir(parents=True, exist_ok=True)
            tools = write_dumps(self.ranks(), out, self.host)
            fs.write_json_atomic(out / f".done-{self.host}.json", {"tools": tools}, durable=False)
        if self._mine(fs.read_json(self.hangs / KILL)):
            self.kill()
