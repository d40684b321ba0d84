"""Fuzz `hpcqwen render` with mutated job specs and print the counts (the bigger version of
tests/unit/test_spec_fuzz.py).

    .venv/bin/python bench/spec_fuzz.py [--mutants 300] [--seed 1] [--timeout 5] [--only grpo.yaml]

Every shipped spec in jobspecs/ gets `--mutants` mutants (tests/spec_mutants.py: YAML structure,
values, raw bytes, --set overrides, the cluster profile). Each renders in a forked child limited to
`--timeout` seconds and 3 GiB of address space. Prints the exit codes, the time (max, p99, over 2 s),
timeouts, the largest stderr, mutants that wrote files or printed no file name, and one example line
per kind of finding.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import spec_mutants as sm  # noqa: E402 - after the path set-up above
from helpers import fake_hub_cache  # noqa: E402


def names_a_file(o: sm.Outcome, spec: Path) -> bool:
    """The error text names the spec, the profile, a --set flag or another file (a run dir)."""
    text = o.stderr.decode("utf-8", "replace")
    return any(s in text for s in (str(spec), sm.PROFILE_NAME + ".yaml", "--set ", "/"))


def main() -> None:
    """Generate, run, count, print."""
    p = argparse.ArgumentParser()
    p.add_argument("--mutants", type=int, default=300, help="mutants per shipped spec")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--only", default=None, help="one spec file name")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shipped = sorted((REPO / "jobspecs").glob(args.only or "*.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        ws = sm.Workspace.create(Path(tmp) / "ws")
        os.environ["HPCQWEN_TINY_MODEL"] = str(_tiny_model(Path(tmp)))
        os.environ["HPCQWEN_RUN_ROOT"] = str(ws.runs)
        # offline (HF_HUB_OFFLINE=1), the shipped specs' hub ids validate only when the cache holds them
        os.environ["HF_HUB_CACHE"] = str(fake_hub_cache(Path(tmp) / "hf-hub-cache"))
        sm.warm_up([ws.specs / s.name for s in shipped])
        outcomes = []
        t0 = time.time()
        for spec in shipped:
            mutator = sm.Mutator(spec.read_text(), sm.spec_seed(spec.name, args.seed), ws.mark, sm.profile_text())
            for m in mutator.mutants(args.mutants):
                outcomes.append(sm.run_mutant(ws, m, timeout=args.timeout))
        report(outcomes, ws, time.time() - t0, args)


def report(outcomes: list[sm.Outcome], ws: sm.Workspace, wall: float, args: argparse.Namespace) -> None:
    """Print the table."""
    spec = ws.specs / "mutant.yaml"
    codes = collections.Counter("timeout" if o.rc is None else str(o.rc) for o in outcomes)
    times = sorted(o.seconds for o in outcomes)
    bad = {
        "exit 70 (internal)": [o for o in outcomes if o.rc == 70],
        "other exit codes": [o for o in outcomes if o.rc not in (0, 1, 70, None)],
        f"timeout (> {args.timeout:g} s)": [o for o in outcomes if o.rc is None],
        "over 2 s wall": [o for o in outcomes if o.seconds > 2.0],
        "over 1 s of CPU": [o for o in outcomes if o.cpu_seconds > 1.0],
        "stderr over 64 KiB": [o for o in outcomes if o.stderr_size > 64 << 10],
        "wrote files": [o for o in outcomes if o.written],
        "exit 1 without a file name": [o for o in outcomes if o.rc == 1 and not names_a_file(o, spec)],
    }
    print(f"spec fuzz: {len(outcomes)} mutants of {len({o.mutant.op for o in outcomes})} operators, seed "
          f"{args.seed}, {wall:.0f} s")
    print("| exit code | mutants |\n| --- | --- |")
    for code, n in sorted(codes.items()):
        print(f"| {code} | {n} |")
    print(f"time: max {times[-1]:.2f} s, p99 {times[int(len(times) * 0.99)]:.3f} s, median "
          f"{times[len(times) // 2]:.3f} s; largest stderr {max(o.stderr_size for o in outcomes)} bytes")
    for what, items in bad.items():
        print(f"{what}: {len(items)}")
        seen: set[tuple[str, str]] = set()
        for o in items:
            line = _first_problem(o)
            if (o.mutant.op, line[:60]) not in seen and len(seen) < 6:
                seen.add((o.mutant.op, line[:60]))
                print(f"    [{o.mutant.op}] {line[:160]}")


def _first_problem(o: sm.Outcome) -> str:
    lines = o.stderr.decode("utf-8", "replace").strip().splitlines()
    internal = [x for x in lines if x.startswith(("error[internal]", "Traceback"))]
    tail = internal or [x for x in lines if x.strip() and not x.startswith("error[spec]")]
    return tail[0].strip()[:300] if tail else f"(no output, {o.seconds:.1f} s)"


def _tiny_model(tmp: Path) -> Path:
    """A tiny Qwen3 for the tiny specs, built in a subprocess (torch stays out of this one)."""
    subprocess.run([sys.executable, "-m", "hpcqwen.testing", "tiny-qwen3", str(tmp / "tiny")], check=True,
                   capture_output=True)
    return tmp / "tiny"


if __name__ == "__main__":
    main()
