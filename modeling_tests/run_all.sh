#!/usr/bin/env bash
# The test command: builds the two supported stacks in fresh virtual environments and runs the suite in each.
#   newest:   transformers 5.23.0, torch 2.13.0 (CPU), accelerate
#   blog-era: transformers 4.38.2 (no qwen2_moe of its own), torch 2.13.0 (CPU), accelerate
# Usage: bash modeling_tests/run_all.sh [newest|blog-era|all] [extra pytest args]
# Env: VENV_ROOT (default: the repository), PYTHON (default: python3), KEEP_VENVS=1 to reuse existing venvs.
set -euo pipefail
cd "$(dirname "$0")/.."
which_stacks=${1:-all}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python3}
VENV_ROOT=${VENV_ROOT:-$PWD}

declare -A STACK_PACKAGES=(
  [newest]="torch==2.13.0 transformers==5.23.0 accelerate"
  [blog-era]="torch==2.13.0 transformers==4.38.2 accelerate"
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
  "$venv/bin/python" -m pytest modeling_tests -p no:cacheprovider -q -rs "$@"
}

status=0
case "$which_stacks" in
  newest|blog-era) run_stack "$which_stacks" "$@" || status=$? ;;
  all)
    run_stack newest "$@" || status=$?
    run_stack blog-era "$@" || status=$?
    ;;
  *) echo "unknown stack '$which_stacks' (newest | blog-era | all)" >&2; exit 2 ;;
esac
exit $status
