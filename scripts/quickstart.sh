#!/usr/bin/env bash
# scripts/quickstart.sh: set up (scripts/setup.sh), build the tiny random Qwen3 the quickstart trains
# (no model hub needed), then run the quickstart job and wait for it: a LoRA SFT on the local Slurm
# cluster when it can run here, else on the local backend (`--backend auto`). Extra args go to submit.
# The vLLM venv (.venv-vllm, ~2 min) is skipped: only distillation uses it (scripts/setup-vllm.sh builds
# it; HPCQWEN_NO_VLLM=0 scripts/quickstart.sh builds it here too). Ends with the commands to run next.
set -euo pipefail
cd "$(dirname "$0")/.."
HPCQWEN_NO_VLLM=${HPCQWEN_NO_VLLM:-1} scripts/setup.sh
export HPCQWEN_TINY_MODEL=${HPCQWEN_TINY_MODEL:-$HOME/.cache/hpcqwen/qwen3-tiny}
.venv/bin/python -m hpcqwen.testing tiny-qwen3 "$HPCQWEN_TINY_MODEL"
.venv/bin/hpcqwen submit jobspecs/quickstart.yaml --wait "$@"
run_dir=$(ls -d "${HPCQWEN_RUN_ROOT:-$HOME/hpcqwen-runs}"/quickstart/*/ | tail -1)
cat <<NEXT

Next (the hpcqwen command lives in .venv; activate it once per shell):
  source .venv/bin/activate
  hpcqwen status ${run_dir}                    # how the job ended
  hpcqwen logs ${run_dir}                      # its log
  hpcqwen plot ${run_dir}                      # loss curve -> ${run_dir}metrics.png
  hpcqwen export ${run_dir} --merge-lora       # a merged model to chat with or share
  HPCQWEN_TINY_MODEL=${HPCQWEN_TINY_MODEL} hpcqwen submit jobspecs/qwen3-tiny-grpo.yaml --wait   # GRPO, same tiny model
  scripts/setup-vllm.sh                        # only for distillation (vLLM venv, ~2 min)
NEXT
