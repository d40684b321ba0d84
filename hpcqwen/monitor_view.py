"""Pure rendering of the queue monitor: rows and a clock in, a rich renderable out.

Nothing here reads files or calls Slurm, so a frame is a function of (rows, now, width) and is
golden-tested with `Console(record=True, width=...)`. Only the visible window of rows is laid
out (`height`), so a frame over 10,000 runs costs about what a frame over 50 does.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hpcqwen.monitor import Progress, RunRow, TaskRow
from hpcqwen.polling import PollStatus
from hpcqwen.slurm import SLURM_STATES, JobState

STATE_STYLE = {JobState.RUNNING: "green", JobState.PENDING: "yellow", JobState.SUCCEEDED: "blue",
               JobState.FAILED: "bold red", JobState.CANCELLED: "magenta", JobState.STOPPED: "cyan",
               JobState.UNKNOWN: "bold magenta"}
TASK_GLYPH = {JobState.RUNNING: "●", JobState.PENDING: "○", JobState.SUCCEEDED: "✓", JobState.FAILED: "✗",
              JobState.CANCELLED: "⊘", JobState.STOPPED: "‖", JobState.UNKNOWN: "?"}
MAX_TASK_MAP = 32  # longer arrays show counts only
STALE_METRICS_S = 600.0

# squeue's %r for pending jobs, in words (Slurm 22.05 `squeue --help` / slurm.h reason table).
REASON_WORDS = {
    "Resources": "waiting for free nodes/GPUs",
    "Priority": "queued behind higher-priority jobs",
    "Dependency": "waiting for another job",
    "DependencyNeverSatisfied": "dependency can never be satisfied: cancel it",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "BeginTime": "not eligible yet (begin time or requeue delay)",
    "JobArrayTaskLimit": "array throttle: waits for a running task",
    "ReqNodeNotAvail": "requested nodes are down, drained or reserved",
    "PartitionTimeLimit": "time limit exceeds the partition's",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionDown": "partition is down",
    "PartitionInactive": "partition is inactive",
    "NodeDown": "a needed node is down",
    "BadConstraints": "constraints can never be met",
    "Reservation": "waiting for its reservation",
    "launch failed requeued held": "launch failed; requeued and held",
    "NotInQueue": "not in squeue; sacct has no record (yet)",
    "NoData": "unknown: Slurm does not answer",
    "InvalidAccount": "invalid account",
    "InvalidQOS": "invalid QOS",
}
DEP_WORDS = {"afterok": "to succeed", "afterany": "to end", "afternotok": "to fail", "after": "to start",
             "aftercorr": "(same task) to succeed", "singleton": "(same name) to end"}
NEVER_WORDS = {"afterok": "did not succeed", "afternotok": "succeeded", "aftercorr": "did not succeed",
               "after": "never started"}


def reason_words(reason: str, dependency: str = "") -> str:
    """A pending reason in words; an unknown reason verbatim."""
    if reason == "Dependency" and dependency:
        return dependency_words(dependency)
    if reason == "DependencyNeverSatisfied" and dependency:
        return f"can never start: {dependency_words(dependency, never=True)} (cancel it)"
    if reason in REASON_WORDS:
        return REASON_WORDS[reason]
    m = re.match(r"(QOS|Assoc)(Grp|Max)?(\w*?)(Limit|MinutesLimit)?$", reason)
    if m and reason not in ("QOS", "Assoc"):
        return f"{m.group(1)} limit reached ({reason})"
    return reason


def dependency_words(dep: str, never: bool = False) -> str:
    """squeue %E -> words: afterok:12_*(unfulfilled) -> 'waiting for array 12 to succeed'; with
    `never`, only the failed parts: afterok:12(failed) -> 'job 12 did not succeed'."""
    out = []
    for part in dep.split(","):
        m = re.match(r"(\w+):(\d+)(_\*|_\d+)?(?:\((\w+)\))?", part)
        if not m:
            out.append(part)
            continue
        kind, job, task, state = m.groups()
        what = f"array {job}" if task == "_*" else f"job {job}{task or ''}"
        if never and state == "failed":
            out.append(f"{what} {NEVER_WORDS.get(kind, 'failed its condition')}")
        elif not never:
            out.append(f"waiting for {what} {DEP_WORDS.get(kind, kind)}")
    return "; ".join(out) or dep


# ---- number formats -------------------------------------------------------------------------

def fmt_age(seconds: float | None) -> str:
    """Compact age: 45s, 12m, 1h05m, 2d03h."""
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_clock(seconds: float | None) -> str:
    """Slurm-style H:MM:SS (D-HH:MM:SS past a day); '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def fmt_count(x: float | None) -> str:
    """1234 -> 1.2k, 2_500_000 -> 2.5M."""
    if x is None:
        return ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def sparkline(values: Sequence[float], width: int = 10) -> str:
    """Unicode block sparkline of the last `width` values."""
    vals = list(values)[-width:]
    if len(vals) < 2:
        return ""
    lo, hi = min(vals), max(vals)
    bars = "▁▂▃▄▅▆▇█"
    if hi - lo < 1e-12:
        return bars[3] * len(vals)
    return "".join(bars[min(7, int((v - lo) / (hi - lo) * 7.999))] for v in vals)


# ---- selection of rows ------------------------------------------------------------------------

_ORDER = {JobState.RUNNING: 0, JobState.PENDING: 1, JobState.UNKNOWN: 2, JobState.FAILED: 3,
          JobState.STOPPED: 4, JobState.CANCELLED: 5, JobState.SUCCEEDED: 6}


_RANK = {word: _ORDER[folded] for word, folded in SLURM_STATES.items()}  # one dict lookup per row


def sort_rows(rows: Iterable[RunRow]) -> list[RunRow]:
    """Running, then pending, unknown, failed, stopped, cancelled, done; newest submission first within."""
    unknown = _ORDER[JobState.UNKNOWN]
    return sorted(rows, key=lambda r: (_RANK.get(r.slurm_state, unknown), -(r.submitted_at or 0), r.job_id))


def filter_rows(rows: Iterable[RunRow], name: str = "", states: Sequence[str] = (), user: str = "") -> list[RunRow]:
    """Rows whose name matches `name` (glob, or substring without wildcards), whose state is one
    of `states` (Slurm's word or the folded one, any case), and that belong to `user`."""
    want = {s.upper() for s in states}
    glob = name if any(c in name for c in "*?[") else f"*{name}*"
    return [r for r in rows
            if (not name or fnmatch.fnmatchcase(r.name, glob))
            and (not want or r.slurm_state.upper() in want or r.state.value in want
                 or any(t.slurm_state.upper() in want for t in r.tasks))
            and (not user or r.user == user)]


Line = tuple[RunRow, "TaskRow | None"]


def lines_of(rows: Sequence[RunRow], expanded: Iterable[str] = ()) -> list[Line]:
    """Table lines: one per run, plus one per task of each expanded array (keyed by job_id)."""
    exp = set(expanded)
    out: list[Line] = []
    for r in rows:
        out.append((r, None))
        if r.job_id in exp:
            out += [(r, t) for t in r.tasks]
    return out


def window(n_lines: int, selected: int | None, height: int | None) -> tuple[int, int]:
    """[start, stop) of the lines that fit in `height`, keeping `selected` visible."""
    if height is None or n_lines <= height:
        return 0, n_lines
    sel = selected or 0
    start = min(max(0, sel - height // 2), n_lines - height)
    return start, start + height


# ---- cells ----------------------------------------------------------------------------------

def _state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE[SLURM_STATES.get(state, JobState.UNKNOWN)])


def task_map(tasks: Sequence[TaskRow]) -> Text:
    """● running ○ pending ✓ done ✗ failed ⊘ cancelled ? unknown, one per task, then counts."""
    folded = [SLURM_STATES.get(t.slurm_state, JobState.UNKNOWN) for t in tasks]
    text = Text()
    if len(tasks) <= MAX_TASK_MAP:
        for f in folded:
            text.append(TASK_GLYPH[f], style=STATE_STYLE[f])
        text.append(" ")
    counts = Counter(folded)
    text.append(" ".join(f"{counts[f]}{TASK_GLYPH[f]}" for f in _ORDER if counts[f]), style="dim")
    return text


def will_overrun(row: RunRow | TaskRow, limit_s: float | None, elapsed: float | None) -> bool:
    """The ETA lies beyond the remaining wall time."""
    eta = row.progress.eta_s if row.progress else None
    return bool(eta is not None and limit_s and elapsed is not None and eta > limit_s - elapsed)


def _detail(row: RunRow, task: TaskRow | None, now: float, elapsed: float | None) -> Text:
    item: RunRow | TaskRow = task or row
    state = SLURM_STATES.get(item.slurm_state, JobState.UNKNOWN)
    if task is None and row.is_array and row.tasks:
        return task_map(row.tasks).append(f"  {row.note}" if row.note else "")
    if state == JobState.PENDING or item.reason in ("DependencyNeverSatisfied", "NotInQueue", "NoData"):
        words = reason_words(item.reason, row.dependency if task is None else "")
        style = "red" if item.reason == "DependencyNeverSatisfied" else "yellow" if state == JobState.PENDING else ""
        return Text(words, style=style)
    if state == JobState.RUNNING:
        if item.alert:  # the hang watchdog: STALLED, stragglers, a reported hang
            return Text(item.alert, style="bold red" if item.alert.startswith(("STALLED", "hang")) else "yellow")
        if will_overrun(item, row.time_limit_s, elapsed):
            left = (row.time_limit_s or 0) - (elapsed or 0)
            return Text(f"⚠ won't finish: {fmt_age(left)} left", style="bold red")
        p = item.progress
        if p and p.updated_at and now - p.updated_at > STALE_METRICS_S:
            return Text(f"no metrics for {fmt_age(now - p.updated_at)}", style="yellow")
        if p and p.phase and p.phase != "train":
            return Text(p.phase, style="cyan")
    return Text(item.reason if state == JobState.UNKNOWN else "")


def _elapsed(row: RunRow, task: TaskRow | None, now: float) -> float | None:
    if task is None:
        return row.elapsed_now(now)
    if task.elapsed_s is None:
        return None
    ticking = row.elapsed_at and task.slurm_state == "RUNNING"
    return task.elapsed_s + (max(0.0, now - row.elapsed_at) if ticking and row.elapsed_at else 0.0)


def _cells(row: RunRow, task: TaskRow | None, now: float, opt: set[str], is_expanded: bool) -> dict[str, Text]:
    item: RunRow | TaskRow = task or row
    elapsed = _elapsed(row, task, now)
    p = item.progress
    if task is None:
        mark = ("▾ " if is_expanded else "▸ ") if row.is_array and row.tasks else ""
        name = Text(mark + row.name, style="bold")
    else:
        name = Text(f"  └ {task.label or f'task {task.task_id}'}", style="dim")
    res = "" if task else f"{row.nodes}×{row.gpus_per_node}" if row.gpus_per_node else str(row.nodes or "")
    limit = f"/{fmt_age(row.time_limit_s)}" if row.time_limit_s else ""
    step = ""
    if p and p.step is not None:
        step = f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step)
    loss = Text(f"{p.loss:.4g} " if p and p.loss is not None else "")
    if p and p.losses:
        loss.append(sparkline(p.losses, 6), style="cyan")
    running = SLURM_STATES.get(item.slurm_state) == JobState.RUNNING
    overrun = running and will_overrun(item, row.time_limit_s, elapsed)
    eta = Text(fmt_age(p.eta_s if p and running else None) + (" ⚠" if overrun else ""),
               style="bold red" if overrun else "")
    ck_step, ck_at = item.checkpoint_step, item.checkpoint_at
    cells = {
        "RUN": name, "JOB": Text(task.job_id if task else row.job_id), "STATE": _state_text(item.slurm_state),
        "DETAIL": _detail(row, task, now, elapsed), "N×GPU": Text(res),
        "TIME": Text(f"{fmt_age(elapsed)}{limit}" if elapsed is not None else ""),
        "RST": Text(str(item.restarts) if item.restarts else ""), "STEP": Text(step), "LOSS": loss,
        "TOK/S": Text(fmt_count(p.tokens_per_s) if p else ""), "ETA": eta,
        "CKPT": Text(f"{ck_step} {fmt_age(now - ck_at)}" if ck_step is not None and ck_at else "")}
    if "REWARD" in opt:
        cells["REWARD"] = Text(f"{p.reward_mean:.3f}" if p and p.reward_mean is not None else "")
    if "SHARDS" in opt:
        cells["SHARDS"] = Text(_shards(p))
    if "GPU·H" in opt:
        cells["GPU·H"] = Text(f"{item.gpu_hours:.3g}" if item.gpu_hours is not None else "")
    return cells


def _shards(p: Progress | None) -> str:
    if p is None or (p.done is None and p.shards_done is None):
        return ""
    done = f"{fmt_count(p.done)}/{fmt_count(p.total)}" if p.done is not None and p.total else ""
    return " ".join(x for x in (f"{p.shards_done}sh" if p.shards_done is not None else "", done) if x)


# Columns: (name, drop order (0 = never), max width).
# DETAIL (pending reason in words, array task map, warnings) comes last, as squeue's REASON does,
# so it keeps whatever width is left.
COLUMNS = [("RUN", 0, 24), ("JOB", 0, 12), ("STATE", 0, 14), ("N×GPU", 5, 6), ("TIME", 3, 13), ("RST", 8, 3),
           ("STEP", 1, 14), ("LOSS", 2, 14), ("TOK/S", 6, 7), ("ETA", 1, 9), ("CKPT", 7, 10), ("REWARD", 3, 7),
           ("SHARDS", 4, 14), ("GPU·H", 4, 7), ("DETAIL", 0, 64)]
RIGHT = {"N×GPU", "TIME", "RST", "STEP", "TOK/S", "ETA", "CKPT", "REWARD", "SHARDS", "GPU·H"}
OPTIONAL = ("REWARD", "SHARDS", "GPU·H")  # shown only when some row has them
DETAIL_MIN = 16
GAP = 2


def layout(widths: dict[str, int], width: int) -> dict[str, int]:
    """Column widths that fit `width`: DETAIL shrinks to DETAIL_MIN first, then the least
    important columns go (drop order, highest first), then RUN is cut."""
    cols = dict(widths)
    cols["DETAIL"] = min(DETAIL_MIN, cols["DETAIL"])

    def total() -> int:
        return sum(cols.values()) + GAP * (len(cols) - 1)
    order = {n: d for n, d, _ in COLUMNS}
    drop = sorted((c for c in cols if order[c]), key=lambda c: -order[c])
    while total() > width and drop:
        cols.pop(drop.pop(0))
    if total() > width:
        cols["RUN"] = max(8, cols["RUN"] - (total() - width))
    cols["DETAIL"] = max(cols["DETAIL"], min(widths["DETAIL"], cols["DETAIL"] + width - total()))
    return cols


# ---- the frame ------------------------------------------------------------------------------

def header(rows: Sequence[RunRow], now: float, status: PollStatus | None, interval_s: float | None) -> Text:
    """`hpcqwen queue · 5 runs (2 running, 1 pending, 2 ended) · squeue 12s ago, every 30s`."""
    c: Counter[JobState] = Counter()
    for word, n in Counter(r.slurm_state for r in rows).items():
        c[SLURM_STATES.get(word, JobState.UNKNOWN)] += n
    ended = len(rows) - c[JobState.RUNNING] - c[JobState.PENDING] - c[JobState.UNKNOWN]
    unknown = f", {c[JobState.UNKNOWN]} unknown" if c[JobState.UNKNOWN] else ""
    text = Text("hpcqwen queue", style="bold")
    text.append(f" · {len(rows)} run{'' if len(rows) == 1 else 's'} ({c[JobState.RUNNING]} running, "
                f"{c[JobState.PENDING]} pending, "
                f"{ended} ended{unknown})")
    if status is not None and status.fetched_at:
        every = f", every {fmt_age(interval_s)}" if interval_s else ""
        text.append(f" · squeue {fmt_age(now - status.fetched_at)} ago{every}", style="dim")
    if status is not None and status.skipped:  # another user's odd job name: left out, not fatal
        text.append(f" · {status.skipped} unparseable squeue line{'' if status.skipped == 1 else 's'} skipped",
                    style="yellow")
    return text


def banner(status: PollStatus | None, now: float) -> Text | None:
    """A red line when the controller does not answer (with the data's age), a yellow one when
    it is slow; None when all is well."""
    if status is None:
        return None
    retry = f"next try in {fmt_age(status.next_at - now)}" if status.next_at and status.next_at > now else "retrying"
    if status.error:
        since = f" for {fmt_age(now - status.error_since)}" if status.error_since else ""
        age = (f"showing data from {fmt_age(now - status.fetched_at)} ago" if status.fetched_at
               else "no data yet")
        error = status.error.removeprefix("the Slurm controller does not answer: ")
        return Text(f"⚠ Slurm controller not answering{since} ({error}) — {age}; {retry}",
                    style="bold white on red")
    if status.slow:
        return Text(f"⚠ Slurm controller slow (squeue took {status.duration_s or 0:.1f}s): polling less often; "
                    f"{retry}", style="bold black on yellow")
    return None


def render_table(rows: Sequence[RunRow], now: float, width: int = 120, *, status: PollStatus | None = None,
                 interval_s: float | None = None, selected: int | None = None, expanded: Iterable[str] = (),
                 height: int | None = None, footer: str = "") -> RenderableType:
    """One frame: header, banner (controller trouble), the table (only the lines that fit in
    `height` table lines, keeping `selected` in view), and a footer line."""
    ordered = sort_rows(rows)
    exp = set(expanded)
    lines = lines_of(ordered, exp)
    start, stop = window(len(lines), selected, height)
    opt = set()
    if any(r.progress and r.progress.reward_mean is not None for r in rows):
        opt.add("REWARD")
    if any(r.progress and (r.progress.done is not None or r.progress.shards_done is not None) for r in rows):
        opt.add("SHARDS")
    if any(r.gpu_hours for r in rows):
        opt.add("GPU·H")
    body = [_cells(*lines[i], now, opt, lines[i][0].job_id in exp) for i in range(start, stop)]
    names = [n for n, _, _ in COLUMNS if n in opt or n not in OPTIONAL]
    natural = {n: min(mx, max([len(n)] + [c[n].cell_len for c in body]))
               for n, drop, mx in COLUMNS if n in names and (not drop or any(c[n].plain for c in body))}
    widths = layout(natural, width)
    # Column gap = the box's divider (1) + a left padding of 1.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1), expand=False,
                  header_style="bold")
    for n in names:
        if n in widths:
            table.add_column(n, width=widths[n], no_wrap=True, overflow="ellipsis",
                             justify="right" if n in RIGHT else "left")
    for i, cells in zip(range(start, stop), body, strict=True):
        table.add_row(*(cells[n] for n in names if n in widths), style="reverse" if i == selected else None)
    parts: list[RenderableType] = [header(rows, now, status, interval_s)]
    warn = banner(status, now)
    if warn is not None:
        parts.append(warn)
    parts.append(table if lines else Text("no hpcqwen runs in the queue or under the run root", style="dim"))
    if height is not None and len(lines) > stop - start:
        parts.append(Text(f"lines {start + 1}-{stop} of {len(lines)}", style="dim"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)
