"""A hang's one-page `report.md`: which ranks were stuck where, on which node, and who is the suspect. Pure.

The suspect rule, first match wins:
1. ranks with no heartbeat at all (their node's launcher never started, or the rank never ran);
2. ranks whose node did not answer the dump request (the node or its launcher is gone or stuck);
3. ranks still in a start-up phase while others reached training (stuck loading or rendezvous);
4. ranks NOT waiting in a collective while others are (the others wait for them);
5. ranks behind the others (a smaller step), else the ranks whose heartbeat is oldest.
The suspect node is the node of the suspects, unless the suspects span every node (then no node is
singled out and none is excluded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcqwen.heartbeat import STARTUP_PHASES


@dataclass(frozen=True)
class RankInfo:
    """What the watcher and the dumps know about one rank."""

    rank: int
    host: str
    step: int | None = None  # None: no heartbeat at all
    phase: str = ""
    age_s: float | None = None  # seconds since its heartbeat last changed (the watcher's clock)
    pid: int | None = None
    where: str = ""  # from its stack (hpcqwen.stacks.where)
    in_collective: bool = False
    tool: str = ""  # what dumped its stack ("" when no dump came)
    dump: str = ""  # the dump file's name


def suspects(ranks: list[RankInfo], answered: set[str]) -> tuple[list[RankInfo], str]:
    """(suspect ranks, why) by the rule in the module docstring."""
    rules: list[tuple[Callable[[RankInfo], bool], str]] = [
        (lambda r: r.step is None, "wrote no heartbeat: its launcher did not start, or the rank never ran"),
        (lambda r: r.host not in answered, "its node did not answer the stack-dump request"),
        (lambda r: r.phase in STARTUP_PHASES, "still starting while other ranks reached training"),
    ]
    for pred, why in rules:
        found = [r for r in ranks if pred(r)]
        if found and len(found) < len(ranks):  # a rule true of every rank singles nobody out
            return found, why
    waiting = [r for r in ranks if r.in_collective]
    if waiting and len(waiting) < len(ranks):
        return [r for r in ranks if not r.in_collective], "not in a collective while the other ranks wait in one"
    steps = {r.step for r in ranks if r.step is not None}
    if len(steps) > 1:
        low = min(steps)
        return [r for r in ranks if r.step == low], f"behind the others (step {low})"
    ages = [r.age_s for r in ranks if r.age_s is not None]
    if ages and max(ages) - min(ages) > 1.0:
        return [r for r in ranks if r.age_s == max(ages)], "its heartbeat stopped first"
    return [], "every rank stopped alike (no single suspect)"


def suspect_nodes(found: list[RankInfo], ranks: list[RankInfo]) -> list[str]:
    """Nodes to exclude: the suspects' nodes, unless they are every node of the job."""
    bad = sorted({r.host for r in found})
    return bad if bad and set(bad) != {r.host for r in ranks} else []


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s ago"


def render(kind: str, headline: str, ranks: list[RankInfo], found: list[RankInfo], why: str, action: str,
           detected: str) -> str:
    """The report's markdown.

    Args:
        kind: `hang` or `stuck start`.
        headline: One sentence: the job, the attempt, what the watcher saw.
        ranks: Every rank of the attempt.
        found: The suspect ranks.
        why: Why they are suspects.
        action: What the watchdog did about it.
        detected: When and where it was detected.
    """
    lines = [f"# {kind.capitalize()}: {headline}", "", f"Detected {detected}.", ""]
    if found:
        nodes = ", ".join(sorted({r.host for r in found}))
        lines.append(f"**Suspect:** rank{'s' if len(found) > 1 else ''} {', '.join(str(r.rank) for r in found)} "
                     f"on node {nodes}: {why}.")
    else:
        lines.append(f"**Suspect:** none singled out: {why}.")
    lines += ["", f"**Action:** {action}", "", "| rank | node | pid | step | phase | last heartbeat | where (stack) | "
              "dump |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ranks, key=lambda x: x.rank):
        step = "-" if r.step is None else str(r.step)
        dump = f"{r.dump} ({r.tool})" if r.dump else "none"
        lines.append(f"| {r.rank} | {r.host} | {r.pid or '-'} | {step} | {r.phase or '-'} | {_fmt(r.age_s)} | "
                     f"{(r.where or '-').replace('|', '/')} | {dump.replace('|', '/')} |")
    lines += ["", "The stacks are in the files beside this one (every thread of each rank). A rank waiting in a "
              "collective waits for the ranks that are not in it.", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class ReportSummary:
    """One report of a task, as `hpcqwen hangs` and `hpcqwen status` list it."""

    path: Path
    title: str  # `Hang: job 123, restart 0: no progress on ...`
    suspect: str  # the suspect line without its markup
    action: str


def list_reports(hangs: Path) -> list[ReportSummary]:
    """The reports under a task's `hangs/` folder, oldest first (unreadable ones are skipped)."""
    out = []
    for path in sorted(hangs.glob("*/report.md")) if hangs.is_dir() else []:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        title = lines[0].lstrip("# ").strip() if lines else ""
        suspect = next((x.replace("**Suspect:** ", "") for x in lines if x.startswith("**Suspect:**")), "")
        action = next((x.replace("**Action:** ", "") for x in lines if x.startswith("**Action:**")), "")
        out.append(ReportSummary(path, title, suspect, action))
    return out
