"""What a preflight found: errors (the job would not start, fit or finish), warnings, and what passed."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpcqwen.errors import Problem


@dataclass
class Report:
    """Findings of every check, each with its numbers."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def error(self, key: str, message: str, **kw: str) -> None:
        """Record a problem that stops the submission."""
        self.errors.append(Problem(key, message, **kw))

    def warn(self, key: str, message: str, **kw: str) -> None:
        """Record a risk worth a look; the job is still submitted."""
        self.warnings.append(Problem(key, message, **kw))

    def ok(self, text: str) -> None:
        """Record a check that passed, with its numbers."""
        self.passed.append(text)

    def extend(self, other: Report, prefix: str = "") -> None:
        """Add another report's findings (a pipeline stage's, keys prefixed with `prefix`)."""
        self.errors += [Problem(prefix + p.key, p.message, p.got, p.expected, p.hint) for p in other.errors]
        self.warnings += [Problem(prefix + p.key, p.message, p.got, p.expected, p.hint) for p in other.warnings]
        self.passed += [f"{prefix}{t}" for t in other.passed]
