"""Preflight against the real local cluster, one test per check, each message with its numbers.

A partition that is DOWN, a MaxTime below the job's and an account sbatch refuses cannot be made on the
shared local cluster (every partition is UP and UNLIMITED, accounts are not enforced): those three
tests replace the answer of that one Slurm command (`*_stubbed_*`); everything else asks the cluster.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from hpcqwen import slurm
from hpcqwen.cli import main
from hpcqwen.errors import EXIT_OK, EXIT_USAGE
from hpcqwen.preflight import run_checks
from hpcqwen.preflight.probe import check_path
from hpcqwen.spec import load_spec

pytestmark = pytest.mark.slurm
BASE = "name: pf\nresources: {time_limit_min: 10%s}\ntask: {kind: command, module: hpcqwen.examples.steps}\n"


def _spec(write_spec, resources: str = "", extra: str = ""):
    return load_spec(write_spec(BASE % resources + extra))


def _only(report, key: str) -> str:
    (error,) = [e for e in report.errors if e.key == key]
    return error.message


def test_a_partition_that_does_not_exist(slurm_cluster: str, write_spec, run_root: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(BASE % ", partition: nosuch")
    start = time.monotonic()
    assert main(["submit", str(path)]) == EXIT_USAGE
    assert time.monotonic() - start < 3  # one message, at once
    err = capsys.readouterr().err
    assert f"{path}:2: resources.partition: partition 'nosuch' does not exist on this cluster (got nosuch; " \
           "expected one of debug, high, low) — set resources.partition (see `sinfo`)" in err
    assert not list(run_root.iterdir())  # nothing written, nothing submitted


def test_the_request_must_fit_a_node(slurm_cluster: str, write_spec) -> None:
    report = run_checks(_spec(write_spec, ", gpus_per_node: 3"), cluster=True)
    assert _only(report, "resources.gpus_per_node") == (
        "no node of partition debug fits one node of the job (3 CPUs, 0 MB, 3 GPUs): the largest node (n1) has 4 CPUs, "
        "2000 MB, 2 GPUs")
    report = run_checks(_spec(write_spec, ", cpus_per_task: 9"), cluster=True)
    assert "(9 CPUs, 0 MB, 0 GPUs): the largest node (n1) has 4 CPUs" in _only(report, "resources.cpus_per_task")
    report = run_checks(_spec(write_spec, ", mem_gb: 4"), cluster=True)
    assert "(1 CPUs, 4096 MB, 0 GPUs)" in _only(report, "resources.mem_gb")
    report = run_checks(_spec(write_spec, ", nodes: 4"), cluster=True)
    assert _only(report, "resources.nodes") == ("asks for 4 nodes; partition debug has 3 usable nodes that fit (3 "
                                                "fit, MaxNodes UNLIMITED)")
    fine = run_checks(_spec(write_spec, ", nodes: 2, gpus_per_node: 2"), cluster=True)
    assert not fine.errors
    assert "2 node(s) of 2 CPUs, 2 GPUs, default MB: 3 of 3 nodes of debug fit (largest: 4 CPUs, 2000 MB, 2 GPUs)" \
        in fine.passed
    assert any(p.startswith("sbatch --test-only accepts the job: Job ") for p in fine.passed)


def test_an_array_above_max_array_size_is_chunked(slurm_cluster: str, write_spec) -> None:
    report = run_checks(_spec(write_spec, extra="array: {size: 2500, throttle: 8}\n"), cluster=True)
    assert "array of 2500 tasks > MaxArraySize 1001 (scontrol show config): submitted as 3 arrays of at most 1001 " \
           "tasks, one after another (array.throttle 8)" in report.passed


def _stub(command: str, stdout: str, rc: int = 0, stderr: str = "") -> slurm.RunCmd:
    """The real Slurm, except one command whose answer is given."""
    def run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        if " ".join(argv).startswith(command):
            return subprocess.CompletedProcess(list(argv), rc, stdout, stderr)
        return slurm.run_cmd(argv, timeout)
    return run


PARTITION = ("PartitionName=debug AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime={time} Nodes=n[1-3] "
             "State={state} TotalCPUs=12 TotalNodes=3\n")


def test_a_partition_that_is_down_stubbed_scontrol(slurm_cluster: str, write_spec) -> None:
    run = _stub("scontrol show partition", PARTITION.format(time="UNLIMITED", state="DOWN"))
    report = run_checks(_spec(write_spec), cluster=True, run=run)
    assert _only(report, "resources.partition") == "partition debug is DOWN: jobs queue but do not start"


def test_a_time_limit_over_max_time_stubbed_scontrol(slurm_cluster: str, write_spec) -> None:
    run = _stub("scontrol show partition", PARTITION.format(time="01:00:00", state="UP"))
    report = run_checks(_spec(write_spec).model_copy(), cluster=True, run=run)
    assert not report.errors and "time limit 10 min <= MaxTime 60 min" in report.passed
    report = run_checks(load_spec(write_spec(BASE.replace("10", "90") % "", "long.yaml")), cluster=True, run=run)
    assert _only(report, "resources.time_limit_min") == ("90 min is longer than partition debug's MaxTime (60 min): "
                                                         "the job would never start")


def test_an_account_sbatch_refuses_stubbed_sbatch(slurm_cluster: str, write_spec) -> None:
    run = _stub("sbatch --test-only", "", rc=1, stderr="sbatch: error: Batch job submission failed: Invalid account "
                "or account/partition combination specified\n")
    report = run_checks(_spec(write_spec, ", account: nosuch"), cluster=True, run=run)
    error = next(e for e in report.errors if e.key == "resources")
    assert error.message == ("sbatch --test-only refuses the job: error: Batch job submission failed: Invalid account "
                             "or account/partition combination specified")
    assert error.got == "--partition=debug --account=nosuch"


def test_a_run_root_that_cannot_be_made(slurm_cluster: str, write_spec) -> None:
    spec = _spec(write_spec, extra="cluster: {profile: local, run_root: /etc/hostname/runs}\n")
    report = run_checks(spec, cluster=False)
    assert _only(report, "cluster.run_root") == ("/etc/hostname/runs cannot be made by this user (/etc/hostname exists "
                                                 "and is not a writable folder)")


def test_the_probe_job_checks_the_paths_from_a_node(slurm_cluster: str, write_spec, run_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = Path(__file__).resolve().parents[2] / "jobspecs" / "data" / "sft-tiny.jsonl"
    path = write_spec(f"name: pr\nresources: {{time_limit_min: 10}}\ntask: {{kind: sft, model: /tmp, dataset: "
                      f"[{data}]}}\n")
    assert main(["check", str(path), "--probe"]) == EXIT_USAGE  # /tmp is no model folder (the login-node check)
    capsys.readouterr()
    path = write_spec(BASE % "", "cmd.yaml")
    assert main(["check", str(path), "--probe"]) == EXIT_OK
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "probe:" in x]
    assert "probe: 2 paths usable from n" in line and "s from sbatch to answer" in line
    print(f"\n{line.strip()}")
    assert not (run_root / ".preflight").exists() or not list((run_root / ".preflight").iterdir())
    assert check_path(str(run_root / "no" / "such"), "read") == "not found"
    assert check_path(str(run_root / "deep" / "new"), "write") == "ok"
