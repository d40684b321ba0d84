#!/usr/bin/env bash
# scripts/quickstart.sh: set up (scripts/setup.sh), then run the quickstart job and wait for it.
# On the local Slurm cluster when it can run here, else on the local backend (`--backend auto`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hpcqwen submit jobspecs/quickstart.yaml --wait "$@"
