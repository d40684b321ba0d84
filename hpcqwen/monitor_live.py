"""The full-screen `hpcqwen queue`: rich.Live, raw keys, and polling in a background thread.

Keys: ↑/↓ or j/k move, PgUp/PgDn page, enter/space/→ expand an array (← collapses), l opens
the log tail of the selected job or task (its one log file, which the batch script on the
rank-0 node writes and srun appends to; followed by byte offset like `hpcqwen logs -f`, so it
goes on across requeues), c cancels after a y/N question, / filters by name, r refreshes
now, q quits. The view never waits for Slurm: refreshes run in a thread, and a slow or dead
controller shows as a banner over the last data.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from hpcqwen import runs, slurm
from hpcqwen.errors import HpcqwenError
from hpcqwen.monitor import RunRow, Snapshot, TaskRow, Watch
from hpcqwen.monitor_view import filter_rows, lines_of, render_table, sort_rows

HELP = "↑↓/jk move · enter expand · l log · c cancel · / filter · r refresh · q quit"
FILE_REFRESH_S = 5.0  # metrics and checkpoints are re-read this often; squeue only when the shared cache is due
KEYMAP = {"\x1b[A": "up", "\x1bOA": "up", "\x1b[B": "down", "\x1bOB": "down", "\x1b[C": "right", "\x1bOC": "right",
          "\x1b[D": "left", "\x1bOD": "left", "\x1b[5~": "pgup", "\x1b[6~": "pgdn", "\r": "enter", "\n": "enter",
          "\x7f": "backspace", "\x08": "backspace", "\x1b": "esc"}
_SEQS = sorted(KEYMAP, key=len, reverse=True)  # longest escape sequence first


def parse_keys(data: str) -> list[str]:
    """Bytes typed -> key names ('up', 'enter', 'esc', ...) or the characters themselves."""
    keys, i = [], 0
    while i < len(data):
        seq = next((s for s in _SEQS if data.startswith(s, i)), data[i])
        keys.append(KEYMAP.get(seq, seq))
        i += len(seq)
    return keys


class LiveQueue:
    """State of the full-screen view; `run()` owns the terminal until the user quits."""

    def __init__(self, watch: Watch, console: Console, name: str = "", states: tuple[str, ...] = (),
                 user: str = "") -> None:
        self.watch, self.console = watch, console
        self.name, self.states, self.user = name, states, user
        self.snapshot: Snapshot | None = None
        self.selected, self.sel_key = 0, ("", -1)
        self.expanded: set[str] = set()
        self.mode = "table"  # table | filter | confirm | log
        self._name_before = name
        self.message = ""
        self.confirm: list[str] = []
        self.log_path: Path | None = None
        self.log_offset = 0
        self.log_lines: deque[str] = deque(maxlen=5000)
        self._lock, self._wake, self._stop = threading.Lock(), threading.Event(), threading.Event()
        self._force, self._dirty = False, True

    # ---- polling thread ------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            force, self._force = self._force, False
            try:
                snap = self.watch.refresh(force=force)
            except Exception as e:  # noqa: BLE001 - a bug in one refresh must not kill the view
                self.message = f"refresh failed: {type(e).__name__}: {e}"
            else:
                with self._lock:
                    self.snapshot, self._dirty = snap, True
            self._wake.wait(FILE_REFRESH_S)
            self._wake.clear()

    def refresh_now(self) -> None:
        """Ask the polling thread for a refresh now: it skips the interval and the backoff (not the
        MIN_INTERVAL_S floor shared by every terminal)."""
        self._force = True
        self._wake.set()

    # ---- lines and selection ---------------------------------------------------------------
    def rows(self) -> list[RunRow]:
        """The rows that pass the filters."""
        snap = self.snapshot
        return filter_rows(snap.rows, self.name, self.states, self.user) if snap else []

    def lines(self) -> list[tuple[RunRow, TaskRow | None]]:
        """What the table shows, in order."""
        return lines_of(sort_rows(self.rows()), self.expanded)

    def _key(self, line: tuple[RunRow, TaskRow | None]) -> tuple[str, int]:
        # The run dir, not the job id: `hpcqwen resume` adds a job id to a run's row ("10,13").
        return line[0].run_dir or line[0].job_id, line[1].task_id if line[1] else -1

    def _resolve_selection(self, lines: list[tuple[RunRow, TaskRow | None]]) -> None:
        keys = [self._key(line) for line in lines]
        if self.sel_key in keys:
            self.selected = keys.index(self.sel_key)
        self.selected = max(0, min(self.selected, len(lines) - 1))
        if lines:
            self.sel_key = keys[self.selected]

    def move(self, delta: int) -> None:
        """Move the selection by `delta` lines."""
        lines = self.lines()
        self._resolve_selection(lines)
        self.selected = max(0, min(self.selected + delta, len(lines) - 1))
        if lines:
            self.sel_key = self._key(lines[self.selected])

    def current(self) -> tuple[RunRow, TaskRow | None] | None:
        """The selected line."""
        lines = self.lines()
        self._resolve_selection(lines)
        return lines[self.selected] if lines else None

    # ---- actions ---------------------------------------------------------------------------
    def toggle(self, open_: bool | None = None) -> None:
        """Expand or collapse the selected array."""
        cur = self.current()
        if cur and cur[0].tasks:
            jid = cur[0].job_id
            if open_ is True or (open_ is None and jid not in self.expanded):
                self.expanded.add(jid)
            else:
                self.expanded.discard(jid)
                self.sel_key = (cur[0].run_dir or jid, -1)

    def open_log(self) -> None:
        """Show the log tail of the selected job (task 0 of a collapsed array)."""
        cur = self.current()
        if not cur or not cur[0].run_dir:
            self.message = "no run dir for this line"
            return
        row, task = cur
        index = task.task_id if task else (0 if row.is_array else None)
        ref = runs.RunRef(Path(row.run_dir or ""), row.job_id.split(",")[0],
                          "local" if row.source == "local" else "slurm", index, row.array_size)
        try:
            path = runs.pick_log(ref)
        except HpcqwenError as e:
            path, self.message = None, e.message
        if path is None:
            self.message = self.message or f"no log yet for job {row.job_id} (still pending?)"
            return
        self.log_path, self.log_offset, self.mode = path, 0, "log"
        self.log_lines.clear()
        self.follow_log(limit=256 * 1024)

    def follow_log(self, limit: int | None = None) -> None:
        """Append what the log got since the last look (by byte offset: NFS-safe, no inotify)."""
        if self.log_path is None:
            return
        try:
            text, self.log_offset = runs.read_new(self.log_path, self.log_offset, limit=limit, whole_lines=True)
        except OSError as e:
            self.message = f"cannot read {self.log_path}: {e}"
            return
        if text:
            self.log_lines.extend(text.splitlines())
            self._dirty = True

    def ask_cancel(self) -> None:
        """Ask before cancelling the selected job (or array task)."""
        cur = self.current()
        item = (cur[1] or cur[0]) if cur else None
        # UNKNOWN is hpcqwen's word for "no Slurm row" (Slurm forgot the job: scancel would "succeed" on nothing)
        if cur is None or item is None or item.slurm_state == "UNKNOWN" or slurm.SLURM_STATES.get(
                item.slurm_state, slurm.JobState.UNKNOWN).is_terminal:
            self.message = "nothing to cancel here"
            return
        row, task = cur
        self.confirm = [task.job_id] if task else row.job_id.split(",")
        self.mode = "confirm"

    def do_cancel(self) -> None:
        """scancel the confirmed job ids."""
        try:
            slurm.scancel(self.confirm)
            self.message = f"cancelled {', '.join(self.confirm)}"
        except HpcqwenError as e:
            self.message = f"scancel failed: {e.message}"
        self.mode = "table"
        self.refresh_now()

    def start_filter(self) -> None:
        """Type a new name filter (glob or substring); esc keeps the current one."""
        self._name_before, self.name, self.mode = self.name, "", "filter"

    def handle(self, key: str) -> bool:
        """Apply one key; False means quit."""
        self._dirty = True
        if self.mode == "filter":  # like a pager's search: enter applies, esc keeps the old filter
            if key in ("enter", "esc"):
                self.name = self._name_before if key == "esc" else self.name
                self.mode = "table"
            elif key == "backspace":
                self.name = self.name[:-1]
            elif len(key) == 1 and key.isprintable():
                self.name += key
            return True
        if self.mode == "confirm":
            if key in ("y", "Y"):
                self.do_cancel()
            else:
                self.mode, self.message = "table", "not cancelled"
            return True
        if self.mode == "log":
            if key in ("q", "esc", "l", "left"):
                self.mode = "table"
            elif key == "c":
                self.ask_cancel()
            return True
        self.message = ""
        actions = {"up": lambda: self.move(-1), "k": lambda: self.move(-1), "down": lambda: self.move(1),
                   "j": lambda: self.move(1), "pgup": lambda: self.move(-self._page()),
                   "pgdn": lambda: self.move(self._page()), "g": lambda: self.move(-10**9),
                   "G": lambda: self.move(10**9), "enter": self.toggle, " ": self.toggle, "e": self.toggle,
                   "right": lambda: self.toggle(True), "left": lambda: self.toggle(False), "l": self.open_log,
                   "c": self.ask_cancel, "r": self.refresh_now, "/": self.start_filter}
        if key in ("q", "Q"):
            return False
        if key in actions:
            actions[key]()
        return True

    # ---- frames ----------------------------------------------------------------------------
    def _page(self) -> int:
        return max(1, self.console.size.height - 8)

    def frame(self, now: float) -> RenderableType:
        """The current screen."""
        width, height = self.console.size.width, self.console.size.height
        if self.mode == "log":
            title = Text(f"log: {self.log_path}  (following by byte offset; q/esc back · c cancel)", style="bold")
            tail = list(self.log_lines)[-max(1, height - 2):]
            return Group(title, Text("\n".join(tail)), Text(self.message, style="yellow") if self.message else "")
        lines = self.lines()
        self._resolve_selection(lines)
        footer = HELP
        if self.mode == "filter":
            footer = f"filter by name: {self.name}▏ (enter apply · esc keep {self._name_before!r})"
        elif self.mode == "confirm":
            footer = f"cancel {', '.join(self.confirm)}? y/N"
        elif self.message:
            footer = self.message
        elif self.name:
            footer = f"filter: {self.name!r} · {HELP}"
        snap = self.snapshot
        if snap is None:
            return Text("hpcqwen queue: asking Slurm…", style="dim")
        return render_table(self.rows(), now, width, status=snap.status, interval_s=self.watch.interval_s,
                            selected=self.selected, expanded=self.expanded, height=max(3, height - 8),
                            footer=footer)

    def run(self) -> int:
        """Own the terminal (cbreak mode, alternate screen) until q or Ctrl-C."""
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        threading.Thread(target=self._poll_loop, name="hpcqwen-queue-poll", daemon=True).start()
        try:
            tty.setcbreak(fd)
            with Live(console=self.console, screen=True, auto_refresh=False) as live:
                last = 0.0
                while True:
                    ready, _, _ = select.select([fd], [], [], 0.2)
                    keys = parse_keys(os.read(fd, 1024).decode(errors="ignore")) if ready else []
                    if not all(self.handle(k) for k in keys):
                        return 0
                    if self.mode == "log":
                        self.follow_log()
                    now = time.time()
                    if self._dirty or now - last >= 1.0:
                        self._dirty, last = False, now
                        with self._lock:
                            live.update(self.frame(now), refresh=True)
        except KeyboardInterrupt:
            return 0
        finally:
            self._stop.set()
            self._wake.set()
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
