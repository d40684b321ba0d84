"""The launcher's side of the watchdog, on every node: start-up heartbeats, stack dumps, node 0's watcher.

`NodeWatch` is created by `hpcqwen.launch` when `watchdog.enabled`: it writes the heartbeats of this node's
ranks for the phases before they run (starting, rendezvous, loading), gives each rank the watchdog's
variables (`watchconfig.rank_env`), answers the watcher's dump and kill requests for this node's ranks
(`stacks.Responder`) and, on node 0, runs the `watchdog.Watcher`. Node 0 also clears heartbeat files of
earlier attempts (the launch lease guarantees none of them is alive).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence

from hpcqwen import fs, heartbeat, stacks
from hpcqwen.paths import TaskPaths
from hpcqwen.supervisor import Supervisor
from hpcqwen.watchconfig import Layout, WatchConfig, rank_env
from hpcqwen.watchdog import Watcher


class NodeWatch:
    """One launcher's watchdog duties (see the module docstring)."""

    def __init__(self, cfg: WatchConfig, layout: Layout, task: TaskPaths, node_rank: int, host: str,
                 sup: Supervisor) -> None:
        self.cfg, self.layout, self.task, self.node_rank, self.host, self.sup = cfg, layout, task, node_rank, host, sup
        self.task.heartbeats.mkdir(parents=True, exist_ok=True)
        self.task.hangs.mkdir(parents=True, exist_ok=True)
        first = node_rank * layout.nproc
        self.ranks = list(range(first, first + layout.nproc))
        self.beats = {r: heartbeat.Heartbeat(task.heartbeats / heartbeat.file_name(host, r), layout.job_id,
                                             layout.restart, r, host, cfg.heartbeat_interval_s, source="launcher")
                      for r in self.ranks}
        self.watcher: Watcher | None = None
        self.responder: stacks.Responder | None = None
        if node_rank == 0:
            self.clear_old()
        self.phase("starting")

    def clear_old(self) -> None:
        """Remove heartbeat files of earlier attempts (and a stale request or kill order)."""
        for path in self.task.heartbeats.glob("*.json"):
            data = fs.read_json(path)
            if not isinstance(data, dict) or (data.get("job_id"), data.get("restart")) != \
                    (self.layout.job_id, self.layout.restart):
                with contextlib.suppress(OSError):
                    path.unlink()
        for name in (stacks.REQUEST, stacks.KILL):
            with contextlib.suppress(OSError):
                (self.task.hangs / name).unlink()

    def phase(self, name: str, pids: Sequence[int] = ()) -> None:
        """Write this node's ranks' heartbeats for a launcher phase."""
        for i, r in enumerate(self.ranks):
            b = self.beats[r]
            if i < len(pids):
                b.pid = pids[i]
            b.beat(name, force=True)

    def env(self) -> dict[str, str]:
        """What every rank of this node gets (a site's or user's own NCCL error handling is kept)."""
        nccl = {} if "TORCH_NCCL_ASYNC_ERROR_HANDLING" in os.environ else {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        return {**rank_env(self.cfg, self.host), **nccl}

    def start(self) -> None:
        """After the ranks started: their `loading` heartbeat, the responder, and node 0's watcher."""
        self.phase("loading", [p.pid for p in self.sup.procs])
        self.responder = stacks.Responder(self.task.hangs, self.host, self.layout.job_id, self.layout.restart,
                                          self.local_ranks, self.kill, self.cfg.poll_s)
        self.responder.start()
        if self.node_rank == 0:
            self.watcher = Watcher(self.cfg, self.layout, self.task, self.kill, self.host)
            self.watcher.start()

    def kill(self) -> None:
        """Kill this node's ranks (a hang: no collective can end cleanly)."""
        self.sup.kill_all(signal.SIGKILL)

    def local_ranks(self) -> list[stacks.LocalRank]:
        """This node's ranks with what their heartbeats say about their faulthandler."""
        out = []
        for r, proc in zip(self.ranks, self.sup.procs, strict=False):
            b = fs.read_json(self.task.heartbeats / heartbeat.file_name(self.host, r))
            mine = isinstance(b, dict) and b.get("pid") == proc.pid and b.get("source") == "rank"
            sig = b.get("dump_signal") if mine and isinstance(b, dict) else None
            out.append(stacks.LocalRank(r, proc.pid, self.task.heartbeats / f"{self.host}-{r}.stacks",
                                        sig if isinstance(sig, int) else None))
        return out

    def stop(self) -> str | None:
        """Stop the threads; the OUTCOME line the watcher wrote, if it acted."""
        for t in (self.watcher, self.responder):
            if t is not None:
                t.stopped.set()
        return self.watcher.outcome if self.watcher is not None else None

