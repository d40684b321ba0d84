"""Helpers for the monitor's real-Slurm tests: submit through the CLI, run the CLI as a user would
(a subprocess, in a terminal or not), a private tmux server. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import wait_until

from hpcqwen import slurm
from hpcqwen.cli import main

REPO = Path(__file__).resolve().parents[2]
SUFFIX = uuid.uuid4().hex[:5]  # other engineers' jobs share the cluster: every name here is unique


def submit(root: Path, name: str, body: str) -> tuple[str, Path]:
    """`hpcqwen submit` through the real CLI (in process); returns (job id, run dir)."""
    spec = root / f"{name}.yaml"
    spec.write_text(f"name: {name}\n" + textwrap.dedent(body).lstrip("\n"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["submit", str(spec), "--set", f"cluster.run_root={root}"])
    assert rc == 0, err.getvalue() + out.getvalue()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("submitted job "))
    job, run_dir = line.removeprefix("submitted job ").split("  run dir: ")
    return job, Path(run_dir)


def fake_train(steps: int, step_s: float, *extra: str) -> str:
    args = ", ".join(f"'{a}'" for a in ["--steps", str(steps), "--step-seconds", str(step_s), *extra])
    return f"task: {{kind: command, module: hpcqwen.examples.fake_train, args: [{args}]}}\n"


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m hpcqwen ARGV` as a separate process (stdout is not a terminal)."""
    return subprocess.run([sys.executable, "-m", "hpcqwen", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "220", **(env or {})}, cwd=REPO)


def slurm_state(job: str) -> str:
    rows = slurm.query_jobs([job])[job]
    return rows[0].slurm_state if rows else ""


@dataclass
class MonitorJobs:
    """What the session submitted: a running fake SFT, a job waiting on it, a throttled array."""

    root: Path
    tag: str  # in every name: each module's fixture submits its own set
    pattern: str  # --name glob that matches exactly these runs
    sft: str
    sft_dir: Path
    dep: str
    arr: str
    arr_dir: Path

    @property
    def names(self) -> dict[str, str]:
        return {"sft": f"mon{self.tag}-sft", "dep": f"mon{self.tag}-dep", "arr": f"mon{self.tag}-arr"}


class Tmux:
    """A private tmux server (its own socket, so nobody else's sessions are touched)."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"hpcqwen-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tmp = tmp

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout

    def start(self, argv: list[str], env: dict[str, str], width: int = 200, height: int = 40) -> None:
        """Run `python -m hpcqwen ARGV` in a fresh terminal; the pane stays open and shows EXIT=rc."""
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # COLUMNS/LINES from the environment would override the terminal's real size (tmux started
        # from a captured pytest hands COLUMNS=80 to its panes).
        cmd = (f"cd {shlex.quote(str(REPO))} && env -u COLUMNS -u LINES {envs} {shlex.quote(sys.executable)} "
               f"-m hpcqwen "
               f"{shlex.join(argv)} 2>{shlex.quote(str(self.tmp / 'stderr.txt'))}; echo EXIT=$?; sleep 600")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), "bash", "-c", cmd)

    def screen(self) -> str:
        """What the terminal shows now."""
        return self._tmux("capture-pane", "-p", "-t", "t")

    def send(self, *keys: str) -> None:
        """tmux send-keys (key names such as Enter, Down, Escape, or literal text)."""
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, pred: Callable[[str], bool], timeout: float, what: str) -> str:
        """The screen once pred(screen) holds."""
        last = [""]

        def check() -> str | None:
            last[0] = self.screen()
            return last[0] if pred(last[0]) else None
        try:
            return str(wait_until(check, timeout, what, every=0.3))
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen was:\n{last[0]}") from None

    def stderr(self) -> str:
        path = self.tmp / "stderr.txt"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)
        sock = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.socket
        sock.unlink(missing_ok=True)  # kill-server leaves the socket file behind
