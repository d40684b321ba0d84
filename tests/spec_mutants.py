"""Seeded job-spec mutants and a runner that renders each one in a forked, limited child.

Shared by `tests/unit/test_spec_fuzz.py` (a few hundred mutants per shipped spec, every CI run) and
`bench/spec_fuzz.py` (more of them, with counts). A mutant changes the spec text (YAML structure,
values, raw bytes), its `--set` overrides, or the cluster profile it names. `run_mutant` runs
`hpcqwen render` on it in a forked child (so a hang is killed and a memory blow-up stays in the
child) and records the exit code, the wall time, what it printed and which files appeared.
"""

from __future__ import annotations

import io
import os
import random
import resource
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE_NAME = "fuzzprofile"
OUTPUT_CAP = 1 << 20  # bytes of stdout/stderr kept per mutant (the rest is only counted)

# Shell and #SBATCH payloads; {mark} is a path whose creation would prove that something ran.
PAYLOADS = [
    "$(touch {mark}1)", "`touch {mark}2`", "x; touch {mark}3", "x\ntouch {mark}4", "x\n#SBATCH --wrap=touch {mark}5",
    "x\r\n#SBATCH --wrap=touch {mark}6", "%x-%j", "it's", 'say "hi"', "back\\slash", "a b", "#comment",
    "x && touch {mark}7", "x | tee {mark}8", "${{HOME}}", "$HOME", "x\u2028y", "x\x85y",
]
UNICODE = ["ü", "名前", "🙂", "\u202eevil", "a\u200bb", "Ω" * 200, "\ufeffbom", "e\u0301"]
NUMBERS = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, 0.5, -0.5, 1e-300, 1e30, 1e308,
           3.5, True, False]
RAW_VALUES = [  # YAML text that safe_dump cannot write, or that should reach the parser as written
    "9" * 5000, "-" + "1" * 4400, "0x" + "f" * 3000, ".inf", "-.inf", ".nan", "1.0e+999", "1e5", "010", "0o17",
    "190:20:30", "1_000", "+12", "0b101", "yes", "off", "~", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    "!!python/object/apply:os.system ['touch {mark}9']", "!!python/name:os.system", "!!binary aGVsbG8=",
    "!!set {{a, b}}", "!custom x", "!!str 5", "!!int '7'", "!!float x", "*undefined", "&a 3", "!!omap [a: 1]",
    "{{? [a, b] : c}}", "{{null: 1}}", "{{1: 2}}", "{{true: x}}", "{{<<: {{a: 1}}}}", "[" * 600 + "]" * 600,
    "[" * 5000 + "]" * 5000, "{{a: " * 700 + "1" + "}}" * 700, '"\\0nul"', '"\\e[31mred"', '"\\x7f"',
    '"\\u2028"', "'" + "x" * 300 + "'", "'" + "x" * 100_000 + "'", "'" + "a/" * 3000 + "'",
]
LAUGHS = ("[&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], "
          + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)) + "]")
RAW_VALUES.append(LAUGHS)
CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff", "\x0c", "\x01", "\ud800"]
SET_KEYS = ["=1", "a..b=1", "task.=x", "ü=1", "x" * 5000 + "=1", "cluster.setup=[touch {mark}s]",
            "cluster.template_dir=/tmp", "cluster=" + "a" * 300, "env.X", "name=", "resources=[]",
            "cluster.run_root=/tmp/a#b", "cluster.run_root=/tmp/%j", "depends_on=[" + "9" * 30 + "]"]


@dataclass(frozen=True)
class Mutant:
    """One mutated spec: its file bytes, --set overrides, and (optionally) the profile file it names."""

    op: str
    text: bytes
    overrides: tuple[str, ...] = ()
    profile: bytes | None = None


@dataclass
class Outcome:
    """What `hpcqwen render` did with a mutant (rc None: killed at the time limit)."""

    mutant: Mutant
    rc: int | None
    seconds: float  # wall time, which on a loaded machine measures the machine too
    cpu_seconds: float  # the child's own user + system time: the CLI's work
    stdout: bytes
    stderr: bytes
    stderr_size: int
    written: list[str] = field(default_factory=list)


# ---- mutation -------------------------------------------------------------------------------------

def _paths(node: Any, loc: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [loc]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*loc, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*loc, i))
    return out


def _get(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        data = data[part]
    return data


def _set(data: Any, loc: tuple[Any, ...], value: Any) -> None:
    _get(data, loc[:-1])[loc[-1]] = value


class _Raw(str):
    """A value written into the YAML text as is (a placeholder during safe_dump)."""


def _dump(data: Any) -> str:
    raws: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, _Raw):
            raws.append(str(node))
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(node, dict):
            return {swap(k) if isinstance(k, _Raw) else k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = yaml.safe_dump(swap(data), sort_keys=False, allow_unicode=True, width=1 << 30)
    for i, raw in enumerate(raws):
        text = text.replace(f"'@@RAW{i}@@'", raw).replace(f"@@RAW{i}@@", raw)
    return text


class Mutator:
    """Seeded mutations of one spec (`text` is the spec, `mark` a path prefix for payload files)."""

    def __init__(self, text: str, seed: int, mark: str, profile_text: str) -> None:
        self.text, self.mark, self.profile_text = text, mark, profile_text
        self.rng = random.Random(seed)
        self.data = yaml.safe_load(text)
        self.ops: dict[str, Callable[[], Mutant]] = {
            name.removeprefix("op_"): getattr(self, name) for name in dir(self) if name.startswith("op_")}

    def mutants(self, n: int) -> list[Mutant]:
        """`n` mutants, the operators taken in turn (so every operator is used), arguments at random."""
        names = sorted(self.ops)
        return [self.ops[names[i % len(names)]]() for i in range(n)]

    # helpers
    def _pick_loc(self, data: Any, *, leaves: bool = False) -> tuple[Any, ...]:
        locs = [p for p in _paths(data) if p and (not leaves or not isinstance(_get(data, p), (dict, list)))]
        return self.rng.choice(locs) if locs else ()

    def _value(self) -> Any:
        kind = self.rng.randrange(6)
        if kind == 0:
            return self.rng.choice(NUMBERS)
        if kind == 1:
            return self.rng.choice(PAYLOADS).format(mark=self.mark)
        if kind == 2:
            return self.rng.choice(UNICODE)
        if kind == 3:
            return _Raw(self.rng.choice(RAW_VALUES).format(mark=self.mark))
        return self.rng.choice([None, "", [], {}, [1, "a"], {"a": 1}, "x" * 300, "/" + "a" * 300, "a" * 300 + ".jsonl"])

    def _structural(self, op: str, change: Callable[[Any], None]) -> Mutant:
        data = yaml.safe_load(self.text)
        change(data)
        return Mutant(op, _dump(data).encode("utf-8", "surrogatepass"))

    def _text(self, op: str, text: str | bytes) -> Mutant:
        return Mutant(op, text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))

    # structure: keys and values
    def op_delete_key(self) -> Mutant:
        def change(d: Any) -> None:
            loc = self._pick_loc(d)
            if loc:
                del _get(d, loc[:-1])[loc[-1]]
        return self._structural("delete_key", change)

    def op_replace_value(self) -> Mutant:
        return self._structural("replace_value", lambda d: _set(d, self._pick_loc(d), self._value()))

    def op_replace_leaf(self) -> Mutant:
        return self._structural("replace_leaf", lambda d: _set(d, self._pick_loc(d, leaves=True), self._value()))

    def op_injection(self) -> Mutant:
        def change(d: Any) -> None:
            strings = [p for p in _paths(d) if p and isinstance(_get(d, p), str)]
            payload = self.rng.choice(PAYLOADS).format(mark=self.mark)
            loc = self.rng.choice(strings)
            _set(d, loc, payload if self.rng.random() < 0.5 else _get(d, loc) + payload)
        return self._structural("injection", change)

    def op_section(self) -> Mutant:
        def change(d: Any) -> None:
            key = self.rng.choice(["resources", "requeue", "env", "array", "depends_on", "task", "cluster"])
            d[key] = self.rng.choice([None, [], {}, "", 0, [[]], True])
        return self._structural("section", change)

    def op_add_key(self) -> Mutant:
        def change(d: Any) -> None:
            maps = [p for p in _paths(d) if isinstance(_get(d, p), dict)]
            key = self.rng.choice(["nodes", "x" * 300, "ü", "template_dir", "setup", "kind", "$(x)", "profile"])
            _get(d, self.rng.choice(maps))[key] = self._value()
        return self._structural("add_key", change)

    def op_raw_key(self) -> Mutant:
        key = self.rng.choice(["1", "null", "true", "[a, b]", "? {a: 1}", "2001-01-01", "'x\\ny'", "<<", "*a"])
        return self._text("raw_key", self.text + f"{key}: 1\n")

    def op_profile_ref(self) -> Mutant:
        ref = self.rng.choice(["a" * 300, "../../../../etc/passwd", "/etc/hostname", "", "local/../local",
                               "l\x00cal", "local\n", "$(touch " + self.mark + "p)", "h100-8x "])
        style = self.rng.random() < 0.5
        return self._structural("profile_ref", lambda d: d.__setitem__(
            "cluster", {"profile": ref} if style else ref))

    def op_long_path(self) -> Mutant:
        def change(d: Any) -> None:
            comp = "a" * self.rng.choice([255, 256, 300, 5000])
            loc = self.rng.choice([("cluster",), ("task", "model"), ("task", "dataset"), ("task", "load")])
            if loc == ("cluster",):
                d["cluster"] = {"profile": "local", "run_root": "/tmp/" + comp}
            elif loc[1] in d.get("task", {}):
                _set(d, loc, comp + self.rng.choice(["", ".jsonl", "/x"]))
        return self._structural("long_path", change)

    # text: bytes, encodings, documents
    def op_control_char(self) -> Mutant:
        pos = self.rng.randrange(len(self.text) + 1)
        return self._text("control_char", self.text[:pos] + self.rng.choice(CONTROL) + self.text[pos:])

    def op_line_endings(self) -> Mutant:
        choice = self.rng.randrange(4)
        text = [self.text.replace("\n", "\r\n"), self.text.replace("\n", "\r"), "\ufeff" + self.text,
                self.text.replace("\n", "\u2028")][choice]
        return self._text("line_endings", text)

    def op_encoding(self) -> Mutant:
        choice = self.rng.randrange(4)
        data = [self.text.encode("utf-16"), self.text.encode("utf-8")[: self.rng.randrange(len(self.text))] + b"\xff",
                bytes(self.rng.randrange(256) for _ in range(200)), self.text.encode("latin-1", "replace")][choice]
        return self._text("encoding", data)

    def op_lines(self) -> Mutant:
        lines = self.text.splitlines(keepends=True)
        i = self.rng.randrange(len(lines))
        choice = self.rng.randrange(5)
        if choice == 0:
            lines.insert(i, lines[i])  # duplicate keys
        elif choice == 1:
            del lines[i]
        elif choice == 2:
            lines[i] = " " * self.rng.choice([1, 2, 3, 8]) + lines[i]
        elif choice == 3:
            lines = lines[:i]
        else:
            lines[i] = lines[i].replace(" ", "\t", 1)
        return self._text("lines", "".join(lines))

    def op_documents(self) -> Mutant:
        choice = self.rng.randrange(6)
        text = ["", "---\n", "# only a comment\n", self.text + "---\nname: second\n", "...\n" + self.text,
                "%YAML 1.1\n---\n" + self.text][choice]
        return self._text("documents", text)

    def op_size(self) -> Mutant:
        choice = self.rng.randrange(3)
        text = [self.text + "#" * (2 << 20) + "\n", self.text + "".join(f"k{i}: {i}\n" for i in range(50_000)),
                self.text + "pad: '" + "x" * (1 << 20) + "'\n"][choice]
        return self._text("size", text)

    def op_alias(self) -> Mutant:
        choice = self.rng.randrange(3)
        text = [self.text + "bomb: " + LAUGHS + "\n",
                "a: &a [" + ", ".join(["x"] * 50) + "]\n" + "\n".join(f"b{i}: [*a, *a, *a]" for i in range(2000))
                + "\n" + self.text,
                self.text + "x0: &x0 [1, 2]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]\n"
                                                       for i in range(1, 40))][choice]
        return self._text("alias", text)

    # overrides and profiles
    def op_set(self) -> Mutant:
        overrides = []
        for _ in range(self.rng.randrange(1, 4)):
            if self.rng.random() < 0.3:
                overrides.append(self.rng.choice(SET_KEYS).format(mark=self.mark))
                continue
            loc = self._pick_loc(self.data, leaves=True)
            key = ".".join(str(p) for p in loc if not isinstance(p, int)) or "name"
            value = self._value()
            if isinstance(value, str):
                text = str(value)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()
            overrides.append(f"{key}={text}".replace("\x00", ""))
        return Mutant("set", self.text.encode(), tuple(overrides))

    def op_profile(self) -> Mutant:
        sub = Mutator(self.profile_text, self.rng.randrange(1 << 30), self.mark, self.profile_text)
        name = self.rng.choice(["replace_value", "replace_leaf", "delete_key", "control_char", "encoding",
                                "lines", "documents", "alias", "injection", "add_key", "raw_key", "size"])
        inner = sub.ops[name]()
        data = yaml.safe_load(self.text)
        data["cluster"] = PROFILE_NAME
        return Mutant(f"profile_{name}", _dump(data).encode(), (), inner.text)


# ---- running ----------------------------------------------------------------------------------------

def spec_seed(name: str, seed: int) -> int:
    """A stable per-spec seed (crc32 of the file name, not Python's salted hash)."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def snapshot(*dirs: Path) -> set[str]:
    """Every file and folder under `dirs` (to see what a mutant wrote)."""
    out: set[str] = set()
    for d in dirs:
        out |= {str(p) for p in d.rglob("*")}
    return out


@dataclass
class Workspace:
    """A copy of jobspecs/ (so relative data paths resolve), a run root, a cwd and a profile folder."""

    root: Path

    @property
    def specs(self) -> Path:
        """The copy of jobspecs/."""
        return self.root / "jobspecs"

    @property
    def runs(self) -> Path:
        """HPCQWEN_RUN_ROOT: must stay empty."""
        return self.root / "runs"

    @property
    def cwd(self) -> Path:
        """The mutants' working directory: must stay empty."""
        return self.root / "cwd"

    @property
    def profiles(self) -> Path:
        """HPCQWEN_PROFILE_PATH: the mutated profile is written here."""
        return self.root / "profiles"

    @property
    def mark(self) -> str:
        """Prefix of the files a payload would create if it ran."""
        return str(self.root / "PWNED")

    @classmethod
    def create(cls, root: Path) -> Workspace:
        """Copy jobspecs/ into `root` and make the empty folders."""
        ws = cls(root)
        shutil.copytree(REPO / "jobspecs", ws.specs)
        for d in (ws.runs, ws.cwd, ws.profiles):
            d.mkdir()
        return ws


def run_mutant(ws: Workspace, m: Mutant, timeout: float = 10.0, mem_bytes: int = 3 << 30) -> Outcome:
    """`hpcqwen render` on `m` in a forked child with a wall-time and address-space limit."""
    spec = ws.specs / "mutant.yaml"
    spec.write_bytes(m.text)
    profile = ws.profiles / f"{PROFILE_NAME}.yaml"
    if m.profile is not None:
        profile.write_bytes(m.profile)
    before = snapshot(ws.root)
    out_path, err_path = ws.root / "stdout", ws.root / "stderr"
    argv = ["render", str(spec)] + [a for o in m.overrides for a in ("--set", o)]
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(argv, ws, out_path, err_path, mem_bytes)
    rc, cpu_seconds = _wait(pid, start + timeout)
    seconds = time.perf_counter() - start
    written = sorted(snapshot(ws.root) - before - {str(out_path), str(err_path)})
    for path in (spec, profile):
        path.unlink(missing_ok=True)
    err_size = err_path.stat().st_size
    with err_path.open("rb") as f:
        err = f.read(OUTPUT_CAP)
    with out_path.open("rb") as f:
        out = f.read(OUTPUT_CAP)
    return Outcome(m, rc, seconds, cpu_seconds, out, err, err_size, written)


def _child(argv: list[str], ws: Workspace, out_path: Path, err_path: Path, mem_bytes: int) -> None:
    rc = 99
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
        os.chdir(ws.cwd)
        os.environ.update({"HPCQWEN_RUN_ROOT": str(ws.runs), "HPCQWEN_PROFILE_PATH": str(ws.profiles)})
        from hpcqwen.cli import main

        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 98
    except BaseException:  # noqa: BLE001 - anything escaping cli.main is a finding, reported as rc 99
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _wait(pid: int, deadline: float) -> tuple[int | None, float]:
    """The child's exit code (None: killed at `deadline`) and the CPU seconds it used."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, _, usage = os.wait4(pid, 0)
            return None, usage.ru_utime + usage.ru_stime
        time.sleep(0.002)


def warm_up(paths: list[Path]) -> None:
    """Load and render every shipped spec once in this process, so the forked children inherit the
    imports (a child's time is then the spec's, not the import's)."""
    from hpcqwen.cli import build_parser
    from hpcqwen.errors import HpcqwenError
    from hpcqwen.paths import RunPaths
    from hpcqwen.render import render_sbatch
    from hpcqwen.spec import parse_spec, read_source

    build_parser()  # imports every subcommand module
    for path in paths:
        try:
            source = read_source(path)
            render_sbatch(parse_spec(source), RunPaths(Path("/tmp/warm")), source)
        except HpcqwenError:
            pass


def profile_text() -> str:
    """The local profile's text (the base of the profile mutants)."""
    return (REPO / "cluster" / "profiles" / "local.yaml").read_text()
