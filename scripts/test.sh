#!/usr/bin/env bash
# scripts/test.sh: set up (scripts/setup.sh) and run the whole test suite; extra args go to pytest.
# "no tests collected" (pytest exit code 5) is a failure like any other.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
.venv/bin/python -m pytest "$@"
rc=$?
[ "$rc" = 5 ] && echo "scripts/test.sh: pytest collected no tests: failing" >&2
exit "$rc"
