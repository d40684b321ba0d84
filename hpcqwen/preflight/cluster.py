"""Preflight against the cluster: will Slurm accept the job, and can a node hold it?

Four queries (`hpcqwen.slurminfo`): `scontrol show config` (MaxArraySize), `scontrol show partition`,
`sinfo -N` of the partition, `sbatch --test-only` with the job's resource options (accounts, QOS and
limits that only the controller knows). Each check records its numbers in the report.
"""

from __future__ import annotations

import math
from pathlib import Path

from hpcqwen import arrays, slurm, slurminfo
from hpcqwen.errors import HpcqwenError
from hpcqwen.paths import RunPaths
from hpcqwen.preflight.report import Report
from hpcqwen.render import cpus_per_task, sbatch_flags
from hpcqwen.spec import JobSpec

TEST_ONLY_FLAGS = ("--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--gpus-per-node",
                   "--mem", "--partition", "--account", "--qos", "--constraint", "--exclusive")


def check_cluster(spec: JobSpec, report: Report, run: slurm.RunCmd = slurm.run_cmd) -> list[str]:
    """Run the cluster checks into `report`; returns the GPU types of the nodes that fit (for the memory check)."""
    try:
        return _checks(spec, report, run)
    except HpcqwenError as e:
        report.warn("resources.partition", f"the cluster could not be asked ({e.message}); its checks were skipped")
        return []


def _checks(spec: JobSpec, report: Report, run: slurm.RunCmd) -> list[str]:
    check_array(spec, report, run)
    parts = slurminfo.partitions(run)
    name = spec.resources.partition or spec.cluster.partition or next((p.name for p in parts.values() if p.default),
                                                                      None)
    key = "resources.partition"
    if name is None or name not in parts:
        report.error(key, f"partition {name!r} does not exist on this cluster" if name else
                     "no partition given and the cluster has no default one", got=str(name),
                     expected=f"one of {', '.join(sorted(parts))}", hint="set resources.partition (see `sinfo`)")
        return []
    part = parts[name]
    if part.state != "UP":
        report.error(key, f"partition {name} is {part.state}: jobs queue but do not start", got=name,
                     expected="a partition that is UP", hint="pick another partition (`sinfo`)")
    else:
        report.ok(f"partition {name} is UP")
    _check_time(spec, part, report)
    types = _check_nodes(spec, name, part, report, run)
    _check_test_only(spec, report, run)
    return types


def check_array(spec: JobSpec, report: Report, run: slurm.RunCmd) -> None:
    """The array fits MaxArraySize, or says how it will be chunked."""
    if spec.array is None:
        return
    limit, source = slurminfo.max_array_size(spec.cluster.max_array_size, run)
    n = spec.array.count
    if n <= limit:
        report.ok(f"array of {n} tasks <= MaxArraySize {limit} ({source})")
        return
    chunks = arrays.chunks(n, limit)
    throttle = f", one after another (array.throttle {spec.array.throttle})" if spec.array.throttle else ""
    report.ok(f"array of {n} tasks > MaxArraySize {limit} ({source}): submitted as {len(chunks)} arrays of at most "
              f"{limit} tasks{throttle}")


def _check_time(spec: JobSpec, part: slurminfo.Partition, report: Report) -> None:
    asked = spec.resources.time_limit_min
    if part.max_time_min is not None and asked > part.max_time_min:
        report.error("resources.time_limit_min", f"{asked} min is longer than partition {part.name}'s MaxTime "
                     f"({part.max_time_min} min): the job would never start", got=str(asked),
                     expected=f"<= {part.max_time_min}", hint="shorten it; requeue continues a long run")
    else:
        limit = "UNLIMITED" if part.max_time_min is None else f"{part.max_time_min} min"
        report.ok(f"time limit {asked} min <= MaxTime {limit}")


def _check_nodes(spec: JobSpec, name: str, part: slurminfo.Partition, report: Report,
                 run: slurm.RunCmd) -> list[str]:
    nodes = slurminfo.partition_nodes(name, run)
    cpus, gpus = cpus_per_task(spec), spec.gpus_per_node
    mem_mb = math.ceil(spec.resources.mem_gb * 1024) if spec.resources.mem_gb else 0
    fit = [n for n in nodes if n.cpus >= cpus and n.memory_mb >= mem_mb and n.gpu_count >= gpus]
    usable = [n for n in fit if n.usable]
    want = spec.resources.nodes
    if not fit:
        most = max(nodes, key=lambda n: (n.gpu_count, n.cpus, n.memory_mb), default=None)
        has = (f"the largest node ({most.name}) has {most.cpus} CPUs, {most.memory_mb} MB, {most.gpu_count} GPUs"
               f"{_types(most.gpus)}" if most else "it has no nodes")
        report.error(_node_key(spec, nodes, cpus, mem_mb, gpus), f"no node of partition {name} fits one node of "
                     f"the job ({cpus} CPUs, {mem_mb} MB, {gpus} GPUs): {has}", got=f"{cpus} CPUs, {mem_mb} MB, "
                     f"{gpus} GPUs", hint="ask for less per node and more nodes, or another partition")
        return []
    limit = min(len(usable), part.max_nodes or len(usable))
    if want > limit:
        report.error("resources.nodes", f"asks for {want} nodes; partition {name} has {len(usable)} usable nodes "
                     f"that fit ({len(fit)} fit, MaxNodes {part.max_nodes or 'UNLIMITED'})", got=str(want),
                     expected=f"<= {limit}")
    else:
        report.ok(f"{want} node(s) of {cpus} CPUs, {gpus} GPUs, {mem_mb or 'default'} MB: {len(usable)} of "
                  f"{len(nodes)} nodes of {name} fit (largest: {max(n.cpus for n in fit)} CPUs, "
                  f"{max(n.memory_mb for n in fit)} MB, {max(n.gpu_count for n in fit)} GPUs{_types(fit[0].gpus)})")
    return sorted({t for n in fit for t in n.gpus})


def _types(gpus: dict[str, int]) -> str:
    named = [t for t in gpus if t]
    return f" ({', '.join(named)})" if named else ""


def _node_key(spec: JobSpec, nodes: list[slurminfo.Node], cpus: int, mem_mb: int, gpus: int) -> str:
    """The key that no node satisfies (GPUs first, then memory, then CPUs)."""
    if not any(n.gpu_count >= gpus for n in nodes):
        return "resources.gpus_per_node"
    if not any(n.memory_mb >= mem_mb for n in nodes):
        return "resources.mem_gb"
    return "resources.cpus_per_task"


def _check_test_only(spec: JobSpec, report: Report, run: slurm.RunCmd) -> None:
    flags = [f for f in sbatch_flags(spec, RunPaths(Path(spec.cluster.run_root) / ".preflight"), {})
             if f.split("=")[0] in TEST_ONLY_FLAGS]
    ok, text = slurminfo.test_only(flags, run)
    if ok:
        report.ok(f"sbatch --test-only accepts the job: {text}")
    else:
        report.error("resources", f"sbatch --test-only refuses the job: {text}",
                     got=" ".join(f for f in flags if f.startswith(("--partition", "--account", "--qos"))),
                     hint="check the account, QOS and partition with your site (`sacctmgr show assoc user=$USER`)")
