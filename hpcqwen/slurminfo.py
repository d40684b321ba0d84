"""What the cluster says about itself: config, partitions, nodes, and `sbatch --test-only`.

Thin wrappers through `slurm.run_cmd` (one command each, injectable as `run`) and pure parsers of
their text, for the preflight checks and for chunking arrays under MaxArraySize. A failed query
raises `SlurmCommandError` (or `ControllerUnreachable`); the callers decide what it means.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from hpcqwen import slurm
from hpcqwen.errors import HpcqwenError


@dataclass(frozen=True)
class Partition:
    """One partition of `scontrol show partition`."""

    name: str
    state: str  # UP, DOWN, DRAIN, INACTIVE
    max_time_min: int | None  # None: UNLIMITED
    max_nodes: int | None
    default: bool


@dataclass(frozen=True)
class Node:
    """One node of a partition, as `sinfo -N` reports it."""

    name: str
    cpus: int
    memory_mb: int
    gpus: dict[str, int]  # GRES type ("" when untyped) -> count
    state: str

    @property
    def gpu_count(self) -> int:
        """GPUs of any type."""
        return sum(self.gpus.values())

    @property
    def usable(self) -> bool:
        """Not down, drained or failing (sinfo's state, `*` = not responding)."""
        return not re.match(r"(down|drain|fail|inval|maint|future|unk)", self.state.rstrip("*~#!%$@^-").lower())


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def parse_config(text: str) -> dict[str, str]:
    """`scontrol show config` -> {key: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def minutes(text: str) -> int | None:
    """Slurm's time limit text (`UNLIMITED`, `D-HH:MM:SS`, `HH:MM:SS`, `MM`) in minutes; None = unlimited."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        return None
    d, a, b, c = (int(g) if g else None for g in m.groups())
    if c is not None:  # [D-]HH:MM:SS
        return (d or 0) * 1440 + (a or 0) * 60 + (b or 0) + (1 if c else 0)
    if b is not None:  # [D-]HH:MM or MM:SS
        return (d or 0) * 1440 + (a or 0) * 60 + (b or 0) if d is not None else (a or 0) + (1 if b else 0)
    return (d or 0) * 1440 + (a or 0) * (60 if d is not None else 1)


def parse_partitions(text: str) -> dict[str, Partition]:
    """`scontrol show partition --oneliner` -> {name: Partition}."""
    out = {}
    for line in text.splitlines():
        f = _fields(line)
        if "PartitionName" not in f:
            continue
        nodes = f.get("MaxNodes", "UNLIMITED")
        out[f["PartitionName"]] = Partition(f["PartitionName"], f.get("State", "UNKNOWN"),
                                            minutes(f.get("MaxTime", "UNLIMITED")),
                                            int(nodes) if nodes.isdigit() else None, f.get("Default") == "YES")
    return out


def parse_gres(text: str) -> dict[str, int]:
    """sinfo's %G (`gpu:2`, `gpu:h100:8(S:0-1)`, `gpu:a100:4,gpu:h100:4`, `(null)`) -> {type: count}."""
    out: dict[str, int] = {}
    for item in re.sub(r"\([^)]*\)", "", text).split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        kind = parts[1] if len(parts) == 3 else ""
        out[kind] = out.get(kind, 0) + int(parts[-1])
    return out


def parse_nodes(text: str) -> list[Node]:
    """`sinfo -N -h -o '%N|%c|%m|%G|%T'` -> nodes (a node listed twice is kept once)."""
    out: dict[str, Node] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or parts[0] in out:
            continue
        name, cpus, mem, gres, state = parts
        out[name] = Node(name, int(cpus) if cpus.isdigit() else 0, int(mem) if mem.isdigit() else 0,
                         parse_gres(gres), state)
    return list(out.values())


def show_config(run: slurm.RunCmd = slurm.run_cmd) -> dict[str, str]:
    """The controller's configuration."""
    return parse_config(slurm._checked(["scontrol", "show", "config"], run, 30.0))


def max_array_size(fallback: int, run: slurm.RunCmd = slurm.run_cmd) -> tuple[int, str]:
    """(MaxArraySize, where it came from): the controller's, else `fallback` (the profile's)."""
    try:
        value = show_config(run).get("MaxArraySize", "")
    except HpcqwenError:
        return fallback, "the profile (scontrol show config did not answer)"
    return (int(value), "scontrol show config") if value.isdigit() else (fallback, "the profile")


def partitions(run: slurm.RunCmd = slurm.run_cmd) -> dict[str, Partition]:
    """Every partition the controller shows."""
    return parse_partitions(slurm._checked(["scontrol", "show", "partition", "--oneliner"], run, 30.0))


def partition_nodes(name: str, run: slurm.RunCmd = slurm.run_cmd) -> list[Node]:
    """The nodes of one partition."""
    return parse_nodes(slurm._checked(["sinfo", "-N", "-h", f"--partition={name}", "-o", "%N|%c|%m|%G|%T"],
                                      run, 30.0))


def test_only(flags: Sequence[str], run: slurm.RunCmd = slurm.run_cmd) -> tuple[bool, str]:
    """`sbatch --test-only FLAGS --wrap=true`: (accepted, Slurm's one line: when and where it would start,
    or why it is refused). Nothing is queued."""
    proc = run(["sbatch", "--test-only", *flags, "--wrap=true"], 30.0)
    text = " ".join((proc.stderr + " " + proc.stdout).split())
    return proc.returncode == 0, text.removeprefix("sbatch: ")


def sbatch_options(options: Sequence[str], run: slurm.RunCmd = slurm.run_cmd) -> str:
    """`sbatch --parsable OPTIONS` (a `--wrap` job): the job id."""
    return slurm.parse_sbatch(slurm._checked(["sbatch", "--parsable", *options], run, 60.0))
