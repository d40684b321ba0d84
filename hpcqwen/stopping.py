"""The runner's end of the signal chain: one stop request, however it arrives.

Slurm asks a job to stop in three ways, and each reaches different processes:
- time limit: `--signal=B:USR2@lead` reaches the batch shell only; it touches `TASK_DIR/STOP`;
- preemption and `scancel` (and `scontrol requeue`): SIGTERM to EVERY process of the step
  (launchers, ranks, their helpers), then SIGKILL after GraceTime / KillWait;
- the submitit backend: `--signal=USR2@lead` to every process of the step.
`install_handlers` turns SIGTERM, SIGUSR2 and SIGINT into the same request as the STOP file (and
touches STOP, so ranks the signal did not reach learn it too); `requested()` is what the
training loops check after every step, agreeing over all ranks (`agree`). The runner then saves a
complete checkpoint and exits with `EXIT_STOPPED`, the one "stopped, resumable" exit code.

Also here: `mark_progress` (the attempt got past its first step: a crash after it may be requeued)
and `agree_resume` (rank 0 picks the checkpoint to resume from, every rank uses that one).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_STOPPED = 75  # EX_TEMPFAIL: "stopped after saving; run again to continue"
SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

_received: list[str] = []
_stop_file: Path | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if name == "SIGINT" and "SIGINT" in _received:  # a second Ctrl-C: stop now, unsaved
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    first = not _received
    _received.append(name)
    if _stop_file is not None:
        with contextlib.suppress(OSError):
            _stop_file.touch()
    if first and os.environ.get("LOCAL_RANK", "0") == "0":
        rank = os.environ.get("RANK", "0")
        print(f"hpcqwen: rank {rank} got {name}: saving at the end of this step, then exiting "
              f"(stopped, exit {EXIT_STOPPED})", file=sys.stderr, flush=True)


def install_handlers(stop_file: Path | None) -> None:
    """Catch SIGTERM, SIGUSR2 and SIGINT in this process from now on (call it first thing)."""
    global _stop_file
    _stop_file = stop_file
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    ignore_at_exit(SIGNALS)


def ignore_at_exit(signals: tuple[signal.Signals, ...]) -> None:
    """Ignore these signals once the interpreter starts to exit. Python's finalization resets every
    signal that has a Python handler to SIG_DFL, so a second SIGTERM (Slurm's plus the launcher's
    forwarded one) arriving while a rank exits with 75 would kill it and turn "stopped" into a crash;
    ignored signals are left alone."""
    def ignore() -> None:
        for sig in signals:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_IGN)
    atexit.register(ignore)


def received() -> str | None:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


def requested(stop_file: Path | None = None) -> bool:
    """A stop signal arrived here, or the STOP file exists."""
    path = stop_file or _stop_file
    return bool(_received) or (path is not None and path.exists())


def reset_for_tests() -> None:
    """Forget received signals (tests run several loops in one process)."""
    _received.clear()


# ---- agreement over ranks --------------------------------------------------------------------

_CPU_GROUP: Any = None


def distributed() -> bool:
    """torch.distributed is up with more than one rank."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cpu_group() -> Any:
    """A gloo group for small control messages, so no rank waits behind its GPU stream (an NCCL
    all_reduce plus `.item()` would stall the CUDA pipeline every step). Collective on first use."""
    global _CPU_GROUP
    import torch.distributed as dist

    if _CPU_GROUP is None and dist.get_backend() == "gloo":
        _CPU_GROUP = dist.group.WORLD
    elif _CPU_GROUP is None:
        import datetime

        from hpcqwen.heartbeat import collective_timeout_s

        # new_group does not inherit the world's timeout: longer than every watchdog allowance (DESIGN.md)
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=collective_timeout_s(1800)))
    return _CPU_GROUP


def agree(flag: bool, group: Any = None) -> bool:
    """True on every rank when it is true on any rank (one small all_reduce over gloo)."""
    if not distributed():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group or cpu_group())
    return bool(t.item())


def barrier(group: Any = None) -> None:
    """All ranks meet (no-op for one process)."""
    if distributed():
        import torch.distributed as dist

        dist.barrier(group=group or cpu_group())


def agree_resume(pick: Callable[[], Path | None], group: Any = None) -> Path | None:
    """Rank 0 runs `pick` (e.g. the newest complete checkpoint) and every rank gets its answer, so
    ranks cannot disagree when the folder changes under them between their reads."""
    if not distributed():
        return pick()
    import torch.distributed as dist

    box = [str(pick() or "") if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(box, src=0, group=group or cpu_group())
    return Path(box[0]) if box[0] else None


def mark_progress(path: Path) -> None:
    """Touch `path` (TaskPaths.progress) once this attempt finished a step: the batch script
    requeues a crash only after progress, so a deterministic start-up error is not retried."""
    if not path.exists():
        with contextlib.suppress(OSError):
            path.touch()
