#!/usr/bin/env bash
# The test command: builds the two supported stacks in fresh virtual environments and runs the suite in each.
#   newest:   transformers[serving] 5.23.0 (transformers serve + the openai client), torch 2.13.0 (CPU), accelerate,
#             triton (its kernels run under TRITON_INTERPRET=1),
#             the current peft
#   blog-era: transformers 4.38.2 (no qwen2_moe of its own), torch 2.13.0 (CPU), accelerate 0.27.2 (4.38's Trainer
#             passes Accelerator arguments that accelerate 1.x removed), and the GPTQ stack of its day
#             (optimum 1.17.1 + auto-gptq 0.7.1 + peft 0.9.0): the int4 tests compare against auto-gptq
#   cuda-build: torch 2.14.1 (a CUDA build, ~5.5 GB) + transformers 5.23.0: compiles the CUDA extension for
#             sm_80 + sm_90 with the nvcc on PATH and loads it (no GPU needed), then the GPU-free op tests
#   sanitize: the newest stack's venv, with the CPU ops built with AddressSanitizer + UBSan (QWEN2_MOE_HF_SANITIZE)
#             and the sanitizer runtime preloaded: the op, property and cpu-backend tests, where a read out of
#             bounds aborts the test instead of passing by luck
#   narrower-isa: the newest stack's venv, with the CPU ops built for each instruction set narrower than this
#             machine's own (QWEN2_MOE_HF_CPU_ISA; on an AVX-512 BF16 machine the AVX-512 VNNI, AVX2 and portable
#             builds, on an AVX2-only one the portable build): the kernels' and the decode lane's tests, so that
#             every machine also tests the kernels the other machines get
#   fresh-install: the README's main command as a new user runs it: a clean venv, `pip install .` (not editable),
#             then `qwen2-moe-hf chat` from outside the source tree with a PATH that has no system ninja; it must
#             build the CPU ops, make the demo model and give its answer
# The CPU ops must build on the stacks that run them (QWEN2_MOE_HF_REQUIRE_CPU_OPS=1: conftest.py fails the run
# instead of letting their tests skip).
# Usage: bash modeling_tests/run_all.sh [newest|blog-era|cuda-build|sanitize|narrower-isa|fresh-install|all]
#        [extra pytest args]
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
  [newest]="torch==2.13.0 transformers[serving]==5.23.0 accelerate triton peft matplotlib"
  [blog-era]="torch==2.13.0 transformers==4.38.2 accelerate==0.27.2 optimum==1.17.1 auto-gptq==0.7.1 peft==0.9.0"
  [cuda-build]="torch==2.14.1 transformers==5.23.0 accelerate"
)
STACK_PACKAGES[sanitize]=${STACK_PACKAGES[newest]}
STACK_PACKAGES[narrower-isa]=${STACK_PACKAGES[newest]}
# What each stack runs (default: the whole suite).
declare -A STACK_TESTS=(
  [cuda-build]="modeling_tests/test_cuda_extension.py modeling_tests/test_moe_ops.py"
  [sanitize]="modeling_tests/test_op_boundaries.py modeling_tests/test_op_properties.py modeling_tests/test_moe_ops.py
              modeling_tests/test_properties.py modeling_tests/test_cpu_layer.py modeling_tests/test_moe_backends.py
              modeling_tests/test_gptq.py modeling_tests/test_decode_layer.py"
  [narrower-isa]="modeling_tests/test_op_boundaries.py modeling_tests/test_op_properties.py
                  modeling_tests/test_moe_ops.py modeling_tests/test_gptq.py modeling_tests/test_decode_ops.py
                  modeling_tests/test_decode_linear.py modeling_tests/test_decode_layer.py"
)
# The venv each stack runs in (default: its own).
declare -A STACK_VENV=([sanitize]=newest [narrower-isa]=newest)
# Extra environment per stack.
declare -A STACK_ENV=(
  [newest]="QWEN2_MOE_HF_REQUIRE_CPU_OPS=1"
  [blog-era]="QWEN2_MOE_HF_REQUIRE_CPU_OPS=1"
  [narrower-isa]="QWEN2_MOE_HF_REQUIRE_CPU_OPS=1"
  [sanitize]="QWEN2_MOE_HF_REQUIRE_CPU_OPS=1 QWEN2_MOE_HF_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1
              UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
)

# Whether the stack's venv is made anew (a stack that borrows another's venv reuses it when that one was just made).
needs_venv() {
  local name=$1 venv="$VENV_ROOT/.venv-${STACK_VENV[$1]:-$1}"
  { [ "${KEEP_VENVS:-0}" != 1 ] && [ -z "${STACK_VENV[$name]:-}" ]; } || [ ! -x "$venv/bin/python" ]
}

# A new venv with the stack's packages (not ours: `pip install -e .` writes into the source tree, so it runs once at
# a time, in run_stack).
install_stack_packages() {
  local name=$1 venv="$VENV_ROOT/.venv-$1"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  # torch 2.13.0 comes from local disk here; the rest from the package registry.
  "$venv/bin/pip" install -q --disable-pip-version-check ${STACK_PACKAGES[$name]} >"$venv/pip.log" 2>&1 \
    || { cat "$venv/pip.log"; return 1; }
}

# Stacks whose packages are being installed in the background (`all`): name -> pid.
declare -A INSTALLING=()

run_stack() {
  local name=$1; shift
  local venv="$VENV_ROOT/.venv-${STACK_VENV[$name]:-$name}"
  echo "=== stack $name: ${STACK_PACKAGES[$name]} ($(date -u +%H:%M:%S))"
  if needs_venv "$name"; then
    if [ -n "${INSTALLING[$name]:-}" ]; then
      wait "${INSTALLING[$name]}" || { echo "installing the $name stack failed" >&2; return 1; }
    else
      install_stack_packages "$name" || return 1
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" >>"$venv/pip.log" 2>&1 \
      || { cat "$venv/pip.log"; return 1; }
  fi
  "$venv/bin/python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
  if [ "$name" = narrower-isa ]; then
    local isa isas failed=0
    isas=$("$venv/bin/python" -c "from qwen2_moe_hf.kernels.build import narrower_builds; print(*narrower_builds())")
    [ -n "$isas" ] || { echo "no build narrower than this machine's own"; return 0; }
    for isa in $isas; do
      echo "--- QWEN2_MOE_HF_CPU_ISA=$isa ($(date -u +%H:%M:%S))"
      env ${STACK_ENV[$name]} QWEN2_MOE_HF_CPU_ISA="$isa" \
        "$venv/bin/python" -m pytest ${STACK_TESTS[$name]} -p no:cacheprovider -q -rs "$@" || failed=1
    done
    return $failed
  fi
  local preload=""
  if [ "$name" = sanitize ]; then
    # ASan's runtime must come first; libstdc++ too, or ASan cannot intercept C++ throws (python does not link it).
    preload="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"
  fi
  env ${STACK_ENV[$name]:-} ${preload:+LD_PRELOAD="$preload"} TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
    "$venv/bin/python" -m pytest ${STACK_TESTS[$name]:-modeling_tests} -p no:cacheprovider -q -rs "$@"
}

fresh_install() {
  local venv="$VENV_ROOT/.venv-fresh-install" work
  echo "=== fresh install: pip install . (not editable); qwen2-moe-hf chat outside the tree, no system ninja ($(date -u +%H:%M:%S))"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 transformers==5.23.0 accelerate "$PWD" \
    >"$venv/pip.log" 2>&1 || { cat "$venv/pip.log"; return 1; }
  work=$(mktemp -d)
  # Every program on PATH but ninja: the CPU ops must build with the ninja our package depends on.
  mkdir "$work/bin" "$work/home"
  local dir file
  for dir in ${PATH//:/ }; do
    [ -d "$dir" ] || continue
    for file in "$dir"/*; do
      [ "${file##*/}" = ninja ] || [ -e "$work/bin/${file##*/}" ] || ln -s "$file" "$work/bin/${file##*/}"
    done
  done
  if PATH="$work/bin" command -v ninja >/dev/null; then echo "ninja still on the PATH" >&2; return 1; fi
  (cd "$work" && env -i PATH="$work/bin" HOME="$work/home" LANG=C.UTF-8 HF_HUB_OFFLINE=1 \
      "$venv/bin/qwen2-moe-hf" chat </dev/null >"$work/out" 2>"$work/err") \
    || { cat "$work/err" "$work/out"; return 1; }
  cat "$work/out"
  grep -q "^assistant> A large language model is a neural network" "$work/out" \
    || { echo "the demo model's answer is missing" >&2; cat "$work/err"; return 1; }
  grep -q "cpu: available" "$work/err" || { echo "the CPU ops did not build" >&2; cat "$work/err"; return 1; }
  rm -rf "$work"
}

status=0
case "$which_stacks" in
  newest|blog-era|cuda-build|sanitize|narrower-isa) run_stack "$which_stacks" "$@" || status=$? ;;
  fresh-install) fresh_install || status=$? ;;
  all)
    # Each stack's packages install in the background while the stacks before it run: pip waits on the network and
    # the disk more than on the CPU, and one after the other they took ~5 of CI's 30 minutes.
    for name in newest blog-era cuda-build; do
      if needs_venv "$name"; then
        install_stack_packages "$name" & INSTALLING[$name]=$!
      fi
    done
    fresh_install || status=$?
    run_stack newest "$@" || status=$?
    run_stack sanitize "$@" || status=$?
    run_stack narrower-isa "$@" || status=$?
    run_stack blog-era "$@" || status=$?
    run_stack cuda-build "$@" || status=$?
    ;;
  *) echo "unknown stack '$which_stacks'" \
          "(newest | blog-era | cuda-build | sanitize | narrower-isa | fresh-install | all)" >&2
     exit 2 ;;
esac
exit $status
