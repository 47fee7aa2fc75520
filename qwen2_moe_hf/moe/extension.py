"""Building and loading the C++ ops in qwen2_moe_hf/csrc with torch.utils.cpp_extension.

Built on first use (JIT) and cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), or ahead
of time with `python -m qwen2_moe_hf.moe.extension` / `qwen2-moe-hf build-ext`. Never needed by `pip install`;
when there is no compiler the backends that need the ops report why and `auto` uses another one.
"""

import functools
import logging
import os
import shutil
import sys

import torch

logger = logging.getLogger("qwen2_moe_hf")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
ENV_NO_BUILD = "QWEN2_MOE_HF_NO_EXT_BUILD"  # 1: never compile; use only what is already built


def _cpu_flags():
    """Vector flags this machine runs: AVX2 + FMA + F16C when present, else portable code."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "generic", []


@functools.lru_cache(maxsize=None)
def load_cpu_ops():
    """Load (building if needed) the CPU ops; returns (True, "") or (False, why not). Registers
    torch.ops.qwen2_moe_hf.moe_ffn_cpu."""
    from . import ops  # noqa: F401  (the schemas the compiled implementations attach to)

    if torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::moe_ffn_cpu", "CPU"):
        return True, ""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False, "no C++ compiler found (install g++ or set CXX) to build the CPU ops"
    tag, vector_flags = _cpu_flags()
    name = f"qwen2_moe_hf_cpu_{tag}_torch{torch.__version__.split('+')[0].replace('.', '_')}"
    from torch.utils import cpp_extension

    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if os.environ.get(ENV_NO_BUILD) == "1" and not os.path.isfile(os.path.join(build_dir, f"{name}.so")):
        return False, f"the CPU ops are not built and {ENV_NO_BUILD}=1 forbids building them"
    try:
        cpp_extension.load(
            name=name,
            sources=[os.path.join(CSRC, "cpu", "moe_ffn_cpu.cpp"), os.path.join(CSRC, "cpu", "moe_ops_cpu.cpp")],
            extra_cflags=["-O3", "-fopenmp", *vector_flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler errors, missing headers: report, do not crash the model
        logger.warning("qwen2_moe_hf: building the CPU ops failed: %s", exc)
        return False, f"building the CPU ops failed: {str(exc).strip().splitlines()[-1][:300]}"
    return True, ""


def main(argv=None):
    ok, why = load_cpu_ops()
    print("cpu ops:", "built and loaded" if ok else f"unavailable: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
