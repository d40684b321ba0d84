#!/usr/bin/env bash
# scripts/test.sh: set up (scripts/setup.sh) and run the whole test suite; extra args go to pytest.
# "no tests collected" (pytest exit code 5) is a failure like any other. It ends with the 25 slowest
# tests and a count and time per tier (unit, slurm, cpu_dist, cpu_train, slow: tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Several pytest-xdist workers: the cluster tests mostly wait on Slurm, so they overlap the CPU tiers
# (tests/conftest.py: which files run alone on the cluster, and in what order: xdist must keep that order,
# so no reordering of files by test count). HPCQWEN_TEST_WORKERS=0: one process.
.venv/bin/python -m pytest -n "${HPCQWEN_TEST_WORKERS:-3}" --dist loadscope --no-loadscope-reorder --durations=25 "$@"
rc=$?
[ "$rc" = 5 ] && echo "scripts/test.sh: pytest collected no tests: failing" >&2
exit "$rc"
