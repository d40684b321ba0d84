"""Fuzzing the spec parser: seeded mutants of every shipped spec (tests/spec_mutants.py) rendered by
`hpcqwen render` in a forked child. None may end in exit 70 (a bug), use over 1 s of CPU or hang (10 s of
wall time: the suite runs in parallel on 2 cores, so wall time measures the machine's load), write a file, print
an error that names no file or runs to pages, or render a script with a line no spec may add.

HPCQWEN_FUZZ_MUTANTS sets the count per spec (default 100: 1,100 mutants); bench/spec_fuzz.py runs more
and prints counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import spec_mutants as sm

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "jobspecs").glob("*.yaml"))
MUTANTS = int(os.environ.get("HPCQWEN_FUZZ_MUTANTS", "100"))
SEED = 12
CPU_LIMIT = 1.0  # "well under a second" of the CLI's own work; alone, every mutant uses under 0.1 s
# The #SBATCH options hpcqwen writes; a mutant that makes any other appear has injected it.
SBATCH_OPTIONS = {"--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--output",
                  "--open-mode", "--chdir", "--gpus-per-node", "--mem", "--partition", "--account", "--qos",
                  "--constraint", "--exclusive", "--requeue", "--no-requeue", "--signal", "--array", "--dependency"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> sm.Workspace:
    """A copy of jobspecs/ with empty run root, cwd and profile folder; hpcqwen imported and warm."""
    from helpers import fake_hub_cache

    ws = sm.Workspace.create(tmp_path_factory.mktemp("fuzz"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCQWEN_TINY_MODEL", str(tiny_qwen3_dir))
        mp.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path_factory.mktemp("hf-hub-cache"))))
        sm.warm_up([ws.specs / p.name for p in SHIPPED])
    return ws


def judge(o: sm.Outcome, ws: sm.Workspace) -> str:
    """What is wrong with one outcome ('' when nothing is)."""
    err = o.stderr.decode("utf-8", "replace")
    if o.rc is None:
        return f"hung (killed after {o.seconds:.0f} s)"
    if o.rc not in (0, 1):
        return f"exit {o.rc}: {err.strip().splitlines()[-1:] if err.strip() else '(no output)'}"
    if o.cpu_seconds > CPU_LIMIT:
        return f"used {o.cpu_seconds:.2f} s of CPU ({o.seconds:.1f} s wall)"
    if o.written:
        return f"wrote {o.written[:3]}"
    if o.stderr_size > 16 << 10:
        return f"{o.stderr_size} bytes of error output"
    if o.rc == 1:
        names = (str(ws.specs / "mutant.yaml"), str(ws.profiles / f"{sm.PROFILE_NAME}.yaml"), "--set ")
        return "" if any(n in err for n in names) else f"error names no file: {err[:200]!r}"
    return _script_problem(o.stdout.decode("utf-8", "replace"), profile_mutant=o.mutant.profile is not None)


def _script_problem(script: str, profile_mutant: bool) -> str:
    """The header holds only comments and known #SBATCH options; spec values add no shell line: the lines
    before `set -u` are the profile's setup lines, each followed by its exit-status check."""
    from hpcqwen.render import setup_lines

    lines = script.split("\n")
    if lines[0] != "#!/bin/bash" or "set -u" not in lines:
        return "not a batch script"
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    for line in lines[1:end]:
        option = line.removeprefix("#SBATCH ").split("=", 1)[0]
        if line.startswith("#SBATCH") and option not in SBATCH_OPTIONS:
            return f"unexpected #SBATCH line {line[:80]!r}"
    setup = lines[end:lines.index("set -u")]
    if not lines[lines.index("set -u") + 1].startswith("export HPCQWEN_RUN_DIR="):
        return "shell lines between `set -u` and the run dir"
    site = setup_lines(["module load cuda/12.4", "source /shared/venvs/hpcqwen/bin/activate"])
    if setup and not profile_mutant and setup != site:
        return f"shell lines that no profile wrote: {setup[:2]}"
    if setup != setup_lines(setup[0::2]):  # a mutated profile's own setup lines, each followed by its check
        return f"a shell line that is not a checked setup line: {setup[:2]}"
    return ""


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.name for p in SHIPPED])
def test_mutants_of_shipped_spec_fail_cleanly(spec: Path, workspace: sm.Workspace, tiny_qwen3_dir: Path,
                                              hub_ids_cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCQWEN_TINY_MODEL", str(tiny_qwen3_dir))
    mutator = sm.Mutator(spec.read_text(), sm.spec_seed(spec.name, SEED), workspace.mark, sm.profile_text())
    failures, codes = [], {0: 0, 1: 0}
    for m in mutator.mutants(MUTANTS):
        o = sm.run_mutant(workspace, m, timeout=10)
        codes[o.rc if o.rc in codes else 1] += 1
        problem = judge(o, workspace)
        if problem:
            failures.append(f"[{m.op}] {problem}")
    assert not failures, f"{len(failures)} of {MUTANTS} mutants:\n" + "\n".join(failures[:20])
    assert codes[1] > MUTANTS // 2, f"most mutants should be refused: {codes}"  # the mutator really mutates
