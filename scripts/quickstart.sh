#!/usr/bin/env bash
# scripts/quickstart.sh: set up (scripts/setup.sh), build the tiny random Qwen3 the quickstart trains
# (no model hub needed), then run the quickstart job and wait for it: a LoRA SFT on the local Slurm
# cluster when it can run here, else on the local backend (`--backend auto`). Extra args go to submit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HPCQWEN_TINY_MODEL=${HPCQWEN_TINY_MODEL:-$HOME/.cache/hpcqwen/qwen3-tiny}
.venv/bin/python -m hpcqwen.testing tiny-qwen3 "$HPCQWEN_TINY_MODEL"
.venv/bin/hpcqwen submit jobspecs/quickstart.yaml --wait "$@"
run_dir=$(ls -d "${HPCQWEN_RUN_ROOT:-$HOME/hpcqwen-runs}"/quickstart/*/ | tail -1)
echo "metrics: ${run_dir}metrics.jsonl   merge the adapters: .venv/bin/hpcqwen export ${run_dir} --merge-lora"
