"""`hpcqwen queue --me --once` with thousands of another user's jobs in the queue, before and after.

    nice -n 10 .venv/bin/python bench/queue_scale.py [--jobs 2000] [--odd 10] [--repeat 5] [--before REF]

Needs the local cluster (cluster/local/up) and its second Unix user `hpcqwen2`. Sets up, on the
real queue: one hpcqwen run of this user (pending on a held sleeper of this user, its run root
holding unicode), then `--jobs` held jobs of `hpcqwen2` (one sbatch each, as users submit them),
and a finished run of this user under another run root. Runs `python -m hpcqwen queue --me --once`
of the code at REF (default: the merge base with main) and of this tree, alternately, each with a
fresh cache dir, through shims on PATH that run every Slurm client (squeue, sacct, scontrol) as the
user `nobody` and log each call: invocations and bytes of output per run, and the controller RPCs
(sdiag's per-user count of `nobody`, which only these calls use). Then 3 terminals of one user
(one cache dir) look at the finished run once squeue has forgotten it (sacct calls), and last
`--odd` more foreign jobs whose names and work dirs hold `|`, spaces, tabs, unicode and a newline
join the queue. Prints one table per case and the ratios; removes every job it submitted at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECOND_USER = "hpcqwen2"
RPC_USER = "nobody"  # the shims run Slurm clients as this user: sdiag's per-user count isolates them
ODD = ["a|b c", "ünïcødé ✓ 名前", "tab\there", "new\nline|x", "  spaces  "]


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def submit_foreign(n: int, tag: str, ids: list[str], odd: bool = False) -> int:
    """`n` held jobs of SECOND_USER (one sbatch each, 200 per shell); odd names and work dirs if `odd`.
    Their ids are appended to `ids` as they come (so a failure leaves nothing uncancelled); returns n."""
    base = Path(tempfile.gettempdir()) / f"hpcqwen-{tag}-foreign"
    lines = []
    for i in range(n):
        name = f"{ODD[i % len(ODD)]}{i}" if odd else f"q13-{tag}-{i}"
        work = base / (ODD[i % len(ODD)].replace("\n", " ") if odd else "plain") / str(i)
        work.mkdir(parents=True, exist_ok=True)
        lines.append(f"sbatch --hold --parsable -p debug -o /dev/null -J {shell_quote(name)} "
                     f"-D {shell_quote(str(work))} --wrap 'sleep 1'")
    for p in [base, *base.rglob("*")]:
        p.chmod(0o755)
    for i in range(0, n, 200):
        out = sh(["runuser", "-u", SECOND_USER, "--", "bash", "-s"], input="\n".join(lines[i:i + 200])).stdout
        ids += re.findall(r"^(\d+)", out, re.M)
    return n


def shell_quote(text: str) -> str:
    """bash $'...' quoting (newlines and tabs included)."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t") + "'"


def cancel(ids: list[str], user: str | None = None) -> None:
    """scancel the given jobs (as `user`), 500 ids per call."""
    for i in range(0, len(ids), 500):
        prefix = ["runuser", "-u", user, "--"] if user else []
        sh([*prefix, "scancel", *ids[i:i + 500]])


def submit_mine(root: Path, tag: str, ids: list[str]) -> Path:
    """A held sleeper of this user and an hpcqwen run that waits on it (PENDING Dependency), its run
    root named with unicode; their ids are appended to `ids`. Returns the run dir."""
    sleeper = sh(["sbatch", "--hold", "--parsable", "-p", "debug", "-o", "/dev/null", "-J", f"q13-{tag}-sleeper",
                  "--wrap", "sleep 1"], check=True).stdout.strip()
    ids.append(sleeper)
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"q13-{tag}.yaml"
    spec.write_text(f"name: q13-{tag}-mine\nresources: {{time_limit_min: 5}}\ndepends_on: ['{sleeper}']\n"
                    "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1']}\n")
    proc = sh([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--set", f"cluster.run_root={root / 'rünß'}"],
              cwd=REPO, check=True)
    job, run_dir = proc.stdout.strip().splitlines()[-1].removeprefix("submitted job ").split("  run dir: ")
    ids.append(job)
    return Path(run_dir)


def submit_quick(root: Path, tag: str, ids: list[str]) -> str:
    """A one-step hpcqwen run of this user that ends at once (its id appended to `ids`); returns the id."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"q13-{tag}-done.yaml"
    spec.write_text(f"name: q13-{tag}-done\nresources: {{time_limit_min: 5}}\n"
                    "task: {kind: command, module: hpcqwen.examples.steps, args: [--steps, '1', --step-seconds, "
                    "'0.1']}\n")
    proc = sh([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--set", f"cluster.run_root={root}"],
              cwd=REPO, check=True)
    ids.append(proc.stdout.strip().splitlines()[-1].removeprefix("submitted job ").split("  run dir: ")[0])
    return ids[-1]


def terminals(trees: dict[str, Path], shims: Path, run_root: Path, job: str, name: str, work: Path,
              n: int = 3) -> None:
    """Once squeue has forgotten `job` (a finished run under `run_root`), run `queue --me --once` `n`
    times per code in one cache dir (n terminals of one user, within one interval); print the calls."""
    end = time.time() + 240
    while time.time() < end and sh(["squeue", "--noheader", f"--jobs={job}"]).returncode == 0:
        time.sleep(3)
    print(f"\n### {n} terminals of one user within one refresh interval; a finished run ({job}, gone from squeue)"
          " under the run root\n")
    print("| code | squeue/sacct calls per terminal | DBD queries (sacct) in all | finished run shown |")
    print("| --- | --- | --- | --- |")
    for code, path in trees.items():
        cache = work / f"cache-terminals-{uuid.uuid4().hex[:6]}"
        runs = [run_queue(code, path, shims, run_root, name, work, cache=cache) for _ in range(n)]
        calls = ", ".join(f"{r.calls.get('squeue', 0)}/{r.calls.get('sacct', 0)}" for r in runs)
        print(f"| {code} | {calls} | {sum(r.calls.get('sacct', 0) for r in runs)} | {all(r.shown for r in runs)} |")


def make_shims(folder: Path) -> Path:
    """squeue/sacct/scontrol shims that run the real client as RPC_USER and log `name bytes microseconds`
    to FOLDER/.log."""
    log = folder / ".log"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("squeue", "sacct", "scontrol"):
        real = shutil.which(name)
        shim = folder / name
        shim.write_text(f"""#!/bin/bash
t=$(mktemp); s=$(date +%s%N)
runuser -u {RPC_USER} -- {real} "$@" >"$t"; rc=$?
echo "{name} $(stat -c %s "$t") $(( ($(date +%s%N) - s) / 1000 ))" >>{log}
cat "$t"; rm -f "$t"; exit $rc
""")
        shim.chmod(0o755)
    folder.chmod(0o755)
    return folder


def rpc_count() -> int:
    """Controller RPCs RPC_USER made so far (sdiag, per user)."""
    out = sh(["sdiag"], check=True).stdout
    m = re.search(rf"^\s+{RPC_USER}\s+\(\s*\d+\)\s+count:(\d+)", out, re.M)
    return int(m.group(1)) if m else 0


@dataclass
class Run:
    """One `hpcqwen queue` invocation."""

    code: str
    rc: int
    wall_s: float
    calls: dict[str, int]
    out_bytes: int
    squeue_s: float
    rpcs: int
    shown: bool
    error: str


def run_queue(code: str, pythonpath: Path, shims: Path, run_root: Path, run_name: str, work: Path,
              argv: tuple[str, ...] = ("--me", "--once"), cache: Path | None = None) -> Run:
    """`python -m hpcqwen queue ARGV --run-root RUN_ROOT` of the code at `pythonpath` (a fresh cache
    dir unless `cache` is given: then it is another terminal of the same user)."""
    out_log = work / f"out-{uuid.uuid4().hex[:8]}.log"
    (shims / ".log").unlink(missing_ok=True)
    cache = cache or work / f"cache-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "PYTHONPATH": str(pythonpath),
           "HPCQWEN_CACHE_DIR": str(cache), "COLUMNS": "200"}
    before, start = rpc_count(), time.perf_counter()
    proc = sh([sys.executable, "-m", "hpcqwen", "queue", *argv, "--run-root", str(run_root)], env=env, cwd=work,
              timeout=300)
    wall = time.perf_counter() - start
    rpcs = rpc_count() - before - 1  # less sdiag's own call
    entries = [line.split() for line in (shims / ".log").read_text().splitlines()] if (shims / ".log").exists() else []
    calls: dict[str, int] = {}
    for e in entries:
        calls[e[0]] = calls.get(e[0], 0) + 1
    out_log.write_text(proc.stdout + proc.stderr)
    return Run(code, proc.returncode, wall, calls, sum(int(e[1]) for e in entries),
               sum(float(e[2]) for e in entries if e[0] == "squeue") / 1e6, rpcs, run_name in proc.stdout,
               _error_line(proc.stdout + proc.stderr) if proc.returncode else "")


def _error_line(text: str) -> str:
    """The banner or error line of a failed run, clipped for the table."""
    line = next((ln for ln in text.splitlines() if "⚠" in ln or "error" in ln.lower()), "")
    return line.strip().replace("|", "/")[:110]


def export_tree(ref: str, dest: Path) -> Path:
    """The hpcqwen package as of git `ref`, unpacked under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "hpcqwen", "templates",
                              "cluster"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def compare(label: str, trees: dict[str, Path], shims: Path, run_root: Path, run_name: str, work: Path,
            repeat: int) -> dict[str, list[Run]]:
    """Alternate the trees `repeat` times; print one table."""
    runs: dict[str, list[Run]] = {k: [] for k in trees}
    for _ in range(repeat):
        for code, path in trees.items():
            runs[code].append(run_queue(code, path, shims, run_root, run_name, work))
    print(f"\n### {label}\n")
    print("| code | exit | wall s (median) | squeue s (median) | calls squeue/sacct/scontrol | bytes read | "
          "controller RPCs | my run shown | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for code, rs in runs.items():
        r = rs[-1]
        calls = "/".join(str(r.calls.get(c, 0)) for c in ("squeue", "sacct", "scontrol"))
        print(f"| {code} | {sorted({x.rc for x in rs})} | {statistics.median(x.wall_s for x in rs):.2f} | "
              f"{statistics.median(x.squeue_s for x in rs):.3f} | {calls} | {r.out_bytes} | "
              f"{statistics.median(x.rpcs for x in rs):g} | {all(x.shown for x in rs)} | {r.error} |")
    if len(runs) == 2:
        b, a = runs.values()
        wall = statistics.median(x.wall_s for x in b) / statistics.median(x.wall_s for x in a)
        squeue = statistics.median(x.squeue_s for x in b) / max(1e-6, statistics.median(x.squeue_s for x in a))
        print(f"\nratios before/after: wall {wall:.2f}x, squeue {squeue:.1f}x, "
              f"bytes {b[-1].out_bytes / max(1, a[-1].out_bytes):.0f}x")
    return runs


def main() -> None:
    """Set up, measure, tear down."""
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--odd", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--before", default=None, help="git ref of the 'before' code (default: merge base with main)")
    args = p.parse_args()
    before = args.before or sh(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True).stdout.strip()
    tag = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix=f"hpcqwen-qscale-{tag}-"))
    work.chmod(0o755)
    trees = {f"before ({before[:8]})": export_tree(before, work / "before"), "after (this tree)": REPO}
    shims = make_shims(work / "bin")
    foreign: list[str] = []
    mine: list[str] = []
    try:
        done = submit_quick(work / "runs-done", tag, mine)
        run_dir = submit_mine(work / "runs", tag, mine)
        run_root, run_name = run_dir.parents[1], run_dir.parent.name
        print(f"machine: {os.cpu_count()} CPUs; {sh(['squeue', '--version']).stdout.strip()}; Python "
              f"{sys.version.split()[0]}; my run {mine[-1]} in {run_dir}")
        start = time.perf_counter()
        submit_foreign(args.jobs, tag, foreign)
        print(f"submitted {len(foreign)} held jobs of {SECOND_USER} in {time.perf_counter() - start:.1f} s")
        compare(f"{len(foreign)} held jobs of {SECOND_USER}, ordinary names", trees, shims, run_root, run_name,
                work, args.repeat)
        terminals(trees, shims, work / "runs-done", done, f"q13-{tag}-done", work)
        odd = submit_foreign(args.odd, tag, foreign, odd=True)
        compare(f"plus {odd} with `|`, spaces, tabs, unicode and a newline in names and work dirs", trees,
                shims, run_root, run_name, work, args.repeat)
    finally:
        cancel(foreign, SECOND_USER)
        cancel(mine)
        left = sh(["squeue", "--noheader", "-u", SECOND_USER, "-o", "%i"]).stdout.split()
        print(f"\ncancelled {len(foreign)} foreign and {len(mine)} own jobs; {len(set(left) & set(foreign))} left")
        shutil.rmtree(Path(tempfile.gettempdir()) / f"hpcqwen-{tag}-foreign", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
