"""The ranks of one node: start them, pass stop signals on, notice a crash, collect exit codes.

Used by the launcher (`hpcqwen.launch`). Every rank is a child of the launcher in the launcher's
process group, with PR_SET_PDEATHSIG=SIGKILL, so no rank outlives its launcher on any backend
(a killed launcher, a cancelled local run, an srun step torn down).

Exit codes of a rank: 0 done, 75 stopped (saved, resumable: `hpcqwen.stopping.EXIT_STOPPED`),
anything else a failure. When one rank fails the others are killed at once: they would wait in
their next collective for the dead peer until the collective timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hpcqwen.errors import HpcqwenError
from hpcqwen.stopping import EXIT_STOPPED, ignore_at_exit

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1

_early: list[int] = []  # stop signals that came before the Supervisor existed


def catch_early() -> None:
    """First thing in the launcher's process (`python -m hpcqwen launch`, before the heavy imports): a
    stop signal while it imports and reads the spec is kept for `Supervisor.install_handlers`, not a
    death by signal (which the batch script would report as FAILED)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _early.append(signum))


def early_signal() -> int | None:
    """The first stop signal `catch_early` kept, or None."""
    return _early[0] if _early else None


class LaunchError(HpcqwenError):
    """The launcher could not start the ranks."""

    reference = "launch"


def die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_code(returncode: int) -> int:
    """Popen's returncode (negative for a signal) as a shell would report it (128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class Result:
    """How the ranks of this node ended."""

    codes: tuple[int, ...]  # per local rank, shell style
    signal_name: str | None  # the stop signal this launcher got, if any
    first_failure: int = 0  # the code of the rank that failed first (the others were killed after it)

    @property
    def resumable_codes(self) -> set[int]:
        """Codes of ranks that ended without losing saved work: 0, 75, and, once this launcher got a
        stop signal, death by a stop signal (a rank still starting up has no handler yet, and has
        nothing newer than the last checkpoint to lose)."""
        return {0, EXIT_STOPPED} | ({128 + int(s) for s in STOP_SIGNALS} if self.signal_name else set())

    @property
    def outcome(self) -> str:
        """done (all 0), stopped (all resumable, not all 0; or a stop before the ranks started), or failed."""
        if not self.codes:
            return "stopped" if self.signal_name else "failed"
        if all(c == 0 for c in self.codes):
            return "done"
        if all(c in self.resumable_codes for c in self.codes) and not self.first_failure:
            return "stopped"
        return "failed"

    @property
    def failure_code(self) -> int:
        """The code of the rank that failed first (0 when none failed)."""
        if self.outcome != "failed":
            return 0
        return self.first_failure or next((c for c in self.codes if c not in self.resumable_codes), 1)

    @property
    def launcher_exit_code(self) -> int:
        """0 for done and stopped (the outcome file tells them apart), else the failure's code."""
        return self.failure_code

    def outcome_line(self, restart: int) -> str:
        """The OUTCOME file's one line: the word first (the batch script reads only that)."""
        codes = ",".join(str(c) for c in self.codes)
        sig = f" signal={self.signal_name}" if self.signal_name else ""
        return f"{self.outcome} restart={restart} codes={codes}{sig} time={int(time.time())}\n"

    def describe(self) -> str:
        """`stopped (exit codes 75, 75)`."""
        if not self.codes:
            return f"{self.outcome} before they started ({self.signal_name or 'no stop signal'})"
        return f"{self.outcome} (exit codes {', '.join(str(c) for c in self.codes)})"


class Supervisor:
    """Starts the ranks of one node and waits for them."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.procs: list[subprocess.Popen[bytes]] = []
        self.signal_name: str | None = None
        self._ints = 0

    def install_handlers(self) -> None:
        """Stop signals from now on: touch STOP and pass the signal to the ranks."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        ignore_at_exit(STOP_SIGNALS)
        if _early:
            self._on_signal(_early[0], None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._ints += 1
            if self._ints > 1:  # a second Ctrl-C: no save, stop now
                self.kill_all(signal.SIGKILL)
                return
        if self.signal_name is None:
            self.signal_name = name
            print(f"hpcqwen launch: got {name}: asking the ranks to save and stop (STOP)", file=sys.stderr,
                  flush=True)
        with contextlib.suppress(OSError):
            self.stop_file.touch()
        # Under srun the ranks got the signal themselves; under the local backend or a plain kill of
        # this process they did not. A rank treats a repeat like the first (one stop request).
        self.kill_all(signal.SIGUSR2 if signum == signal.SIGHUP else signum)

    def start(self, argv: Sequence[str], envs: Sequence[Mapping[str, str]]) -> None:
        """Start one process of `argv` per environment (one per local rank); none once a stop signal came
        (nothing newer than the last checkpoint exists to save: the attempt ends stopped)."""
        if self.signal_name:
            print(f"hpcqwen launch: {self.signal_name} came before the ranks started: not starting them",
                  file=sys.stderr, flush=True)
            return
        for env in envs:
            self.procs.append(subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                               preexec_fn=die_with_parent))  # noqa: PLW1509

    def kill_all(self, sig: int) -> None:
        """Send `sig` to every rank still running."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def wait(self, poll_s: float = 0.2, grace_s: float = 3.0) -> Result:
        """Wait for every rank; when one fails, kill the others and wait for them.

        A rank killed by a stop signal counts as stopped when this launcher got a stop signal too;
        Slurm signals every process of the step in turn, so the launcher's may come a moment after
        a rank already died of its own: such a death waits `grace_s` before it counts as a crash.
        """
        first, suspect_since = 0, None
        stop_deaths = {128 + int(s) for s in STOP_SIGNALS}
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                if self.signal_name or not any(exit_code(c) in stop_deaths for c in codes if c is not None):
                    break
                suspect_since = suspect_since or time.monotonic()
                if time.monotonic() - suspect_since >= grace_s:
                    break
                time.sleep(poll_s)
                continue
            resumable = Result((), self.signal_name).resumable_codes
            failed = [exit_code(c) for c in codes if c is not None and exit_code(c) not in resumable]
            if failed and all(c in stop_deaths for c in failed) and not self.signal_name:
                suspect_since = suspect_since or time.monotonic()
                if time.monotonic() - suspect_since < grace_s:
                    failed = []
            if failed and not first:
                first = failed[0]
                print(f"hpcqwen launch: a rank failed (exit code {first}); stopping the other ranks of this "
                      "node", file=sys.stderr, flush=True)
                self.kill_all(signal.SIGKILL)
            time.sleep(poll_s)
        if first and first in stop_deaths and self.signal_name:
            first = 0  # the stop signal came within the grace period after all
        return Result(tuple(exit_code(p.returncode) for p in self.procs), self.signal_name, first)
