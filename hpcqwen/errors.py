"""Errors a user can act on, and the exit codes the CLI maps them to (the only such table).

Every error carries what is wrong, where, and a hint; `cli.main` renders them in one format
(pip's DiagnosticPipError style) and prints a traceback only with `--debug`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Exit codes (documented in README.md, "Exit codes").
EXIT_OK = 0
EXIT_USAGE = 1  # invalid spec, bad arguments, missing files
EXIT_SLURM = 2  # a Slurm command failed or the controller is unreachable
EXIT_JOB_FAILED = 3  # `--wait`: the job ended FAILED / CANCELLED / TIMEOUT / ...
EXIT_INTERNAL = 70  # a bug in hpcqwen
EXIT_INTERRUPTED = 130  # Ctrl-C
FIELD_CHARS = 300  # any one part of a message (a path, a value, a key) is cut here: errors stay readable
MAX_ISSUES = 50  # problems listed per spec error; the rest are counted


def clip(text: str, limit: int = FIELD_CHARS) -> str:
    """`text` cut to `limit` characters (with "..." and the length when cut)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


class HpcqwenError(Exception):
    """An error with a message, where it happened, and one concrete fix."""

    exit_code = EXIT_USAGE
    reference = "error"

    def __init__(self, message: str, *, where: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def render(self) -> str:
        """The user-facing text: `error[ref]: what` / `where:` / `hint:`."""
        lines = [f"error[{self.reference}]: {clip(self.message, 4 * FIELD_CHARS)}"]
        if self.where:
            lines.append(f"  where: {clip(self.where)}")
        if self.hint:
            lines.append(f"  hint: {clip(self.hint, 4 * FIELD_CHARS)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Problem:
    """A problem found after parsing (a task's cross-field check, preflight): the key and the numbers;
    `spec.py` turns it into a SpecIssue with the file and line."""

    key: str
    message: str
    got: str = ""
    expected: str = ""
    hint: str = ""


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a job spec: `file:line: key: what (got X; expected Y) — hint`."""

    file: str
    line: int | None
    key: str
    message: str
    got: str = ""
    expected: str = ""
    hint: str = ""

    def render(self) -> str:
        """`file:line: key: message (got X; expected Y) — hint`, each part clipped to FIELD_CHARS."""
        file, key, message = clip(self.file), clip(self.key), clip(self.message, 2 * FIELD_CHARS)
        where = f"{file}:{self.line}" if self.line else file
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        detail = "; ".join(
            part
            for part in (f"got {clip(self.got)}" if self.got else "",
                         f"expected {clip(self.expected, 2 * FIELD_CHARS)}" if self.expected else "")
            if part
        )
        if detail:
            text += f" ({detail})"
        if self.hint:
            text += f" — {clip(self.hint, 2 * FIELD_CHARS)}"
        return text


class SpecError(HpcqwenError):
    """Every problem found in one job spec, reported together."""

    reference = "spec"

    def __init__(self, file: str, issues: Sequence[SpecIssue]) -> None:
        self.file = file
        self.issues = list(issues)
        n = len(self.issues)
        super().__init__(f"{clip(file)}: {n} problem{'s' if n != 1 else ''} in the job spec")

    def render(self) -> str:
        """The header line, then one line per problem (the first MAX_ISSUES)."""
        lines = [f"error[{self.reference}]: {self.message}"] + [f"  {i.render()}" for i in self.issues[:MAX_ISSUES]]
        if len(self.issues) > MAX_ISSUES:
            lines.append(f"  ... and {len(self.issues) - MAX_ISSUES} more")
        return "\n".join(lines)


class SlurmCommandError(HpcqwenError):
    """A Slurm command exited non-zero or printed something we cannot parse."""

    exit_code = EXIT_SLURM
    reference = "slurm"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, *, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        cmd = " ".join(self.argv)
        super().__init__(
            f"`{cmd}` failed with exit code {returncode}: {self.stderr or '(no output)'}", hint=hint
        )


class ControllerUnreachable(HpcqwenError):
    """No Slurm controller answers (or the Slurm client tools are not installed)."""

    exit_code = EXIT_SLURM
    reference = "controller"


class RunDirError(HpcqwenError):
    """A run directory or job id that cannot be found or read."""

    reference = "run-dir"


class UnsafeValue(HpcqwenError):
    """A value that failed the renderer's last check before an `#SBATCH` line (nothing was written)."""

    reference = "unsafe-value"


class JobFailed(HpcqwenError):
    """`--wait` saw the job end in a state other than COMPLETED."""

    exit_code = EXIT_JOB_FAILED
    reference = "job"
