"""What the hang watchdog works with: its settings from the spec (`WatchConfig`), the variables every rank
gets (`rank_env`), who should be beating (`Layout`) and a call it made (`Verdict`). The watcher
(`hpcqwen.watchdog`), its actions (`hpcqwen.hangaction`) and the node launchers share these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpcqwen import heartbeat

if TYPE_CHECKING:
    from hpcqwen.spec import JobSpec

DUMP_ALLOWANCE_S = 120.0  # collective timeouts exceed every allowance by this: the watchdog dumps stacks first


@dataclass(frozen=True)
class WatchConfig:
    """The spec's watchdog and requeue settings, as the watcher uses them."""

    hang_timeout_s: float
    startup_timeout_s: float
    save_timeout_s: float
    on_hang: str
    exclude_bad_node: bool
    straggler_ratio: float | None
    poll_s: float
    requeue_enabled: bool = True
    max_restarts: int = 3
    runner_beats: bool = True  # hpcqwen's runners beat; a `command` module only if it calls hpcqwen.heartbeat

    @classmethod
    def from_spec(cls, spec: JobSpec) -> WatchConfig:
        """From the frozen spec."""
        w = spec.watchdog
        return cls(w.hang_timeout_s, w.startup_timeout_s, w.save_timeout_s, w.on_hang, w.exclude_bad_node,
                   w.straggler_ratio, w.poll_interval_s, spec.requeue.enabled, spec.requeue.max_restarts,
                   runner_beats=spec.task.kind != "command")

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a rank writes its file at most: a tenth of the hang allowance, at most one poll."""
        return min(self.poll_s, self.hang_timeout_s / 10)

    @property
    def collective_timeout_s(self) -> float:
        """torch.distributed's timeout: longer than every allowance, so the watchdog gets the stacks first and
        the timeout is the backstop (watchdog in report mode, or a watcher that died)."""
        return max(self.hang_timeout_s, self.save_timeout_s, self.startup_timeout_s) + DUMP_ALLOWANCE_S

    def allowance(self, phase: str) -> float:
        """Seconds without progress a rank in `phase` is allowed."""
        return self.save_timeout_s if phase in heartbeat.FORCE_PHASES else self.hang_timeout_s


def rank_env(cfg: WatchConfig, host: str) -> dict[str, str]:
    """The variables every rank gets when the watchdog is on."""
    return {heartbeat.ENV_ON: "1", heartbeat.ENV_INTERVAL: f"{cfg.heartbeat_interval_s:g}",
            heartbeat.ENV_HOST: host, heartbeat.ENV_TIMEOUT: f"{cfg.collective_timeout_s:g}"}


@dataclass(frozen=True)
class Layout:
    """Who should be beating: the attempt's job key and restart, ranks per node, the nodes in node-rank order."""

    job_id: str
    restart: int
    nproc: int
    hosts: tuple[str, ...]
    slurm_job: str = ""  # what scontrol/scancel take (123, or 123_4 for an array task); "" outside Slurm

    @property
    def world(self) -> int:
        """Ranks over all nodes."""
        return self.nproc * len(self.hosts)

    def host_of(self, rank: int) -> str:
        """The node a rank runs on."""
        return self.hosts[rank // self.nproc]


@dataclass(frozen=True)
class Verdict:
    """A hang or a stuck start, and the ranks that caused the call."""

    kind: str  # "hang" | "stuck start"
    ranks: tuple[int, ...]
    detail: str
