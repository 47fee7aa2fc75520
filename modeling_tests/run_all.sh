#!/usr/bin/env bash
# The test command: builds the two supported stacks in fresh virtual environments and runs the suite in each.
#   newest:   transformers 5.23.0, torch 2.13.0 (CPU), accelerate, triton (its kernels run under TRITON_INTERPRET=1)
#   blog-era: transformers 4.38.2 (no qwen2_moe of its own), torch 2.13.0 (CPU), accelerate, and the GPTQ stack of
#             its day (optimum 1.17.1 + auto-gptq 0.7.1 + peft 0.9.0): the int4 tests compare against auto-gptq
#   cuda-build: torch 2.14.1 (a CUDA build, ~5.5 GB) + transformers 5.23.0: compiles the CUDA extension for
#             sm_80 + sm_90 with the nvcc on PATH and loads it (no GPU needed), then the GPU-free op tests
# Usage: bash modeling_tests/run_all.sh [newest|blog-era|cuda-build|all] [extra pytest args]
# Env: VENV_ROOT (default: the repository), PYTHON (default: python3), KEEP_VENVS=1 to reuse existing venvs.
set -euo pipefail
cd "$(dirname "$0")/.."
which_stacks=${1:-all}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python3}
VENV_ROOT=${VENV_ROOT:-$PWD}
# JIT-built ops (csrc/) go beside the venvs, so a run builds them as a fresh machine would.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV_ROOT/.torch_extensions}
[ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$TORCH_EXTENSIONS_DIR"

declare -A STACK_PACKAGES=(
  [newest]="torch==2.13.0 transformers==5.23.0 accelerate triton"
  [blog-era]="torch==2.13.0 transformers==4.38.2 accelerate optimum==1.17.1 auto-gptq==0.7.1 peft==0.9.0"
  [cuda-build]="torch==2.14.1 transformers==5.23.0 accelerate"
)
# What each stack runs (default: the whole suite).
declare -A STACK_TESTS=(
  [cuda-build]="modeling_tests/test_cuda_extension.py modeling_tests/test_moe_ops.py"
)

run_stack() {
  local name=$1; shift
  local venv="$VENV_ROOT/.venv-$name"
  echo "=== stack $name: ${STACK_PACKAGES[$name]}"
  if [ "${KEEP_VENVS:-0}" != 1 ] || [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # torch 2.13.0 comes from local disk here; the rest from the package registry.
    "$venv/bin/pip" install -q --disable-pip-version-check ${STACK_PACKAGES[$name]} >"$venv/pip.log" 2>&1 \
      || { cat "$venv/pip.log"; return 1; }
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" >>"$venv/pip.log" 2>&1 \
      || { cat "$venv/pip.log"; return 1; }
  fi
  "$venv/bin/python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} \
    "$venv/bin/python" -m pytest ${STACK_TESTS[$name]:-modeling_tests} -p no:cacheprovider -q -rs "$@"
}

status=0
case "$which_stacks" in
  newest|blog-era|cuda-build) run_stack "$which_stacks" "$@" || status=$? ;;
  all)
    run_stack newest "$@" || status=$?
    run_stack blog-era "$@" || status=$?
    run_stack cuda-build "$@" || status=$?
    ;;
  *) echo "unknown stack '$which_stacks' (newest | blog-era | cuda-build | all)" >&2; exit 2 ;;
esac
exit $status
