"""The rendered batch script, run by bash with stub `srun` and `scontrol` on PATH (the process boundary).

Every (outcome × progress × restart count × requeue answer × requeue settings) combination, and the
signals the batch shell gets (USR2 before the time limit, TERM on scancel), against the Python rule
`hpcqwen.requeue.decide` that the submitit backend uses: both must agree on the exit code, on
whether `scontrol requeue` was called, and on the FINAL line. Plus: spec values render inert.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hpcqwen.paths import RunPaths
from hpcqwen.render import render_sbatch
from hpcqwen.requeue import decide, not_running, refused
from hpcqwen.spec import parse_spec, read_source

STUB_SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
env | grep '^EVIL=' -A3 > "$STUB_DIR/env-seen" || true
touch "$STUB_DIR/started"
if [ "${STUB_MODE:-}" = wait-stop ]; then
  while [ ! -f "$STUB_TASK_DIR/STOP" ]; do sleep 0.01; done
  echo "stub launcher: saved at stop" >> "$STUB_LOG"
fi
[ -n "${STUB_PROGRESS:-}" ] && touch "$STUB_TASK_DIR/PROGRESS"
[ -n "${STUB_OUTCOME:-}" ] && echo "$STUB_OUTCOME restart=0 codes=0" > "$STUB_TASK_DIR/OUTCOME"
exit "${STUB_RC:-0}"
"""
STUB_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo "JobId=$3 JobName=x"; echo "   JobState=${STUB_JOBSTATE:-RUNNING} Reason=None"; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
if [ "${STUB_SCONTROL:-ok}" != ok ]; then
  echo "slurm_requeue error: Requested operation is presently disabled" >&2
  echo "second line" >&2
  exit 1
fi
"""


def _stubs(tmp_path: Path, task_dir: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_DIR": str(tmp_path), "STUB_TASK_DIR": str(task_dir), "HOME": str(tmp_path)}


def _script(tmp_path: Path, text: str, name: str = "job.sbatch") -> tuple[Path, RunPaths]:
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(text)
    source = read_source(spec_path)
    spec = parse_spec(source)
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir(exist_ok=True)
    script = tmp_path / name
    script.write_text(render_sbatch(spec, paths, source))
    return script, paths


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _spec_text(enabled: bool, on_failure: bool, max_restarts: int = 2) -> str:
    return (f"name: pre\nrequeue: {{enabled: {str(enabled).lower()}, on_failure: {str(on_failure).lower()}, "
            f"max_restarts: {max_restarts}}}\ntask: {{kind: command, module: m}}\n")


# outcome the launcher reports (None: no OUTCOME written) and the launcher's exit code
OUTCOMES = [("done", 0), ("stopped", 0), ("failed", 1), (None, 0), (None, 137), ("done", 2),
            ("requeued", 124), ("hung", 124), ("hung", 0)]  # the last three: the hang watchdog (hangaction.py)


@pytest.mark.parametrize(("enabled", "on_failure"), [(True, True), (True, False), (False, True)])
def test_every_outcome_matches_the_python_rule(tmp_path: Path, enabled: bool, on_failure: bool) -> None:
    script, paths = _script(tmp_path, _spec_text(enabled, on_failure))
    task = paths.task(None)
    cases = itertools.product(OUTCOMES, (False, True), (0, 2), ("ok", "refused", "COMPLETING"))
    for (outcome, rc), progress, restarts, answer in cases:
        (tmp_path / "calls.log").unlink(missing_ok=True)
        for stale in (task.outcome, task.final, task.progress, task.stop):  # a previous attempt's files
            stale.write_text("done restart=9\n" if stale == task.outcome else "x\n")
        env = {**_stubs(tmp_path, task.dir), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(restarts),
               "STUB_RC": str(rc), "STUB_OUTCOME": outcome or "", "STUB_PROGRESS": "1" if progress else "",
               "STUB_SCONTROL": "ok" if answer == "COMPLETING" else answer,
               "STUB_JOBSTATE": answer if answer == "COMPLETING" else "RUNNING"}
        proc = subprocess.run(["bash", str(script)], env=env, timeout=30, capture_output=True, text=True)
        case = f"outcome={outcome} rc={rc} progress={progress} restarts={restarts} scontrol={answer}"
        expected = decide(outcome or "failed", rc, restarts, 2, enabled=enabled, on_failure=on_failure,
                          progress=progress)
        requeued = expected.requeue and answer != "COMPLETING"
        if expected.requeue and answer == "COMPLETING":  # scancel'd: never requeued, whatever the outcome
            expected = not_running(outcome or "failed", rc, "COMPLETING")
        elif expected.requeue and answer != "ok":
            expected = refused(outcome or "failed", rc, "slurm_requeue error: Requested operation is presently "
                               "disabled\nsecond line")
        calls = _calls(tmp_path)
        assert ("scontrol requeue 77" in calls) == requeued, (case, calls, proc.stderr)
        assert proc.returncode == expected.exit_code, (case, proc.stderr)
        final = task.final.read_text().strip() if task.final.exists() else None
        assert final == expected.final, (case, proc.stderr)
        assert not task.stop.exists(), case  # the stale STOP is removed before the launcher starts
        assert "No such file" not in proc.stderr, (case, proc.stderr)


def test_the_rule_itself() -> None:
    assert decide("done", 0, 0, 3, enabled=True, on_failure=True, progress=True).exit_code == 0
    stopped = decide("stopped", 0, 3, 3, enabled=True, on_failure=True, progress=True)
    assert (stopped.requeue, stopped.exit_code, stopped.final) == (False, 75, "STOPPED restart limit reached (3 of 3)")
    assert decide("stopped", 0, 1, 3, enabled=True, on_failure=False, progress=False).requeue
    assert decide("done", 9, 0, 3, enabled=True, on_failure=False, progress=True).exit_code == 9  # rc wins
    assert not decide("failed", 1, 0, 3, enabled=True, on_failure=True, progress=False).requeue  # no progress
    assert decide("failed", 1, 0, 3, enabled=True, on_failure=True, progress=True).requeue
    assert decide("stopped", 0, 0, 3, enabled=False, on_failure=True, progress=True).final == "STOPPED requeue is off"


def _signal_run(tmp_path: Path, text: str, env_extra: dict[str, str], task_rel: str, sig: int) -> tuple[int, list[str]]:
    script, paths = _script(tmp_path, text)
    task_dir = paths.root / task_rel
    env = {**_stubs(tmp_path, task_dir), "STUB_MODE": "wait-stop", "STUB_OUTCOME": "stopped", **env_extra}
    (tmp_path / "started").unlink(missing_ok=True)
    proc = subprocess.Popen(["bash", str(script)], env=env)
    deadline = time.time() + 20
    while not (tmp_path / "started").exists():
        assert time.time() < deadline, "the stub launcher never started"
        time.sleep(0.02)
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    return rc, _calls(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_signal_touches_stop_waits_for_the_launcher_then_requeues(tmp_path: Path, sig: int) -> None:
    rc, calls = _signal_run(tmp_path, "name: pre\ntask: {kind: command, module: m}\n", {"SLURM_JOB_ID": "77"}, ".",
                            sig)
    assert rc == 0
    assert calls[1:] == ["stub launcher: saved at stop", "scontrol requeue 77"]


def test_array_task_requeues_itself_by_array_id(tmp_path: Path) -> None:
    text = "name: arr\narray: {size: 4}\ntask: {kind: command, module: m}\n"
    env = {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "3"}
    rc, calls = _signal_run(tmp_path, text, env, "tasks/3", signal.SIGUSR2)
    assert rc == 0 and calls[-1] == "scontrol requeue 50_3"


def test_last_restart_stops_with_75_and_says_why(tmp_path: Path) -> None:
    text = "name: pre\nrequeue: {max_restarts: 2}\ntask: {kind: command, module: m}\n"
    rc, calls = _signal_run(tmp_path, text, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}, ".", signal.SIGUSR2)
    assert rc == 75 and not any(c.startswith("scontrol") for c in calls)
    assert (tmp_path / "run" / "FINAL").read_text() == "STOPPED restart limit reached (2 of 2)\n"


STUB_FAST_EXIT = """#!/bin/bash
touch "$STUB_DIR/started"
while [ ! -f "$STUB_TASK_DIR/STOP" ]; do sleep 0.001; done
exit "${STUB_RC}"
"""


def test_the_launchers_own_code_survives_a_trap_at_its_exit(tmp_path: Path) -> None:
    """The launcher exits the moment the trap touched STOP (15 of 40 tries once kept 128+12 as rc)."""
    script, paths = _script(tmp_path, "name: pre\ntask: {kind: command, module: m}\n")
    env = {**_stubs(tmp_path, paths.root), "SLURM_JOB_ID": "77", "STUB_RC": "3"}
    (tmp_path / "bin" / "srun").write_text(STUB_FAST_EXIT)
    codes = []
    for _ in range(40):
        (tmp_path / "started").unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(script)], env=env, stderr=subprocess.DEVNULL)
        while not (tmp_path / "started").exists():
            time.sleep(0.002)
        proc.send_signal(signal.SIGUSR2)
        codes.append(proc.wait(timeout=30))
    assert codes == [3] * 40  # a failure (no OUTCOME, launcher rc 3) keeps the launcher's code


def test_values_render_inert(tmp_path: Path) -> None:
    evil = f"$(touch {tmp_path}/pwned) `touch {tmp_path}/pwned2` ' \" ; touch {tmp_path}/pwned3\nline2 $HOME"
    # a YAML block scalar keeps the newline; the value reaches the script through `export EVIL=...`
    text = f"name: evil\ncluster: {{profile: local, run_root: {tmp_path}}}\nenv:\n  EVIL: |-\n"
    text += "".join(f"    {line}\n" for line in evil.splitlines())
    text += "task: {kind: command, module: m}\n"
    script, paths = _script(tmp_path, text)
    env = {**_stubs(tmp_path, paths.root), "SLURM_JOB_ID": "77", "STUB_OUTCOME": "done"}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
    assert not list(tmp_path.glob("pwned*")), "a spec value was executed"
    seen = (tmp_path / "env-seen").read_text()
    assert seen.startswith("EVIL=" + evil.splitlines()[0]) and "line2 $HOME" in seen


def test_success_runs_one_launcher_per_node_and_does_not_requeue(tmp_path: Path) -> None:
    script, paths = _script(tmp_path, "name: ok\ntask: {kind: command, module: m}\n")
    env = {**_stubs(tmp_path, paths.root), "SLURM_JOB_ID": "77", "STUB_OUTCOME": "done"}
    assert subprocess.run(["bash", str(script)], env=env, timeout=30).returncode == 0
    calls = _calls(tmp_path)
    assert calls[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=1 ")
    assert calls[0].endswith(f"-m hpcqwen launch {paths.root}")
    assert not any(c.startswith("scontrol") for c in calls)


def _site_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: list[str]) -> tuple[Path, RunPaths]:
    """A script of a site profile whose `setup` lines are `setup`."""
    import json

    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "site11.yaml").write_text(f"setup: {json.dumps(setup)}\n")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))
    return _script(tmp_path, "name: s\ncluster: site11\ntask: {kind: command, module: m}\n")


@pytest.mark.parametrize(("bad", "code"), [("false", 1), ("module_load_that_does_not_exist cuda/99", 127),
                                          ("(exit 3)", 3), ("true; false", 1)])
def test_a_failing_setup_line_ends_the_job_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   bad: str, code: int) -> None:
    script, paths = _site_script(tmp_path, monkeypatch, ["export SITE_A=1", bad, f"touch {tmp_path}/after"])
    env = {**_stubs(tmp_path, paths.root), "SLURM_JOB_ID": "77", "STUB_OUTCOME": "done"}
    proc = subprocess.run(["bash", str(script)], env=env, timeout=30, capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    assert f"hpcqwen: profile setup line 2 failed (exit {code}); nothing was started: {bad}" in proc.stderr
    assert _calls(tmp_path) == [] and not (tmp_path / "after").exists()  # no srun, no later setup line


def test_setup_lines_may_read_unset_variables_and_the_script_is_strict_after(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reads = 'echo "site sees [${HPCQWEN_SURELY_UNSET_11}]"'
    script, paths = _site_script(tmp_path, monkeypatch, [reads, 'test -z "$HPCQWEN_ALSO_UNSET_11"'])
    env = {**_stubs(tmp_path, paths.root), "SLURM_JOB_ID": "77", "STUB_OUTCOME": "done"}
    proc = subprocess.run(["bash", str(script)], env=env, timeout=30, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "site sees []" in proc.stdout and len(_calls(tmp_path)) == 1
    text = script.read_text()
    assert text.index("set -u") > text.index(reads)  # strict mode only after the site's lines


@pytest.mark.parametrize("line", ["module load cuda \\", "if true; then", "echo 'open quote", "a\nb"])
def test_a_setup_line_that_is_not_one_complete_command_is_a_profile_error(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          line: str) -> None:
    from hpcqwen.errors import SpecError

    with pytest.raises(SpecError) as info:
        _site_script(tmp_path, monkeypatch, ["module load x", line])
    (issue,) = info.value.issues
    assert issue.file.endswith("site11.yaml") and issue.key.endswith("setup[1]") and issue.line == 1
    assert "one complete shell command" in issue.message
