"""Building and loading the C++ ops in qwen2_moe_hf/csrc with torch.utils.cpp_extension.

Built on first use (JIT) and cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), or ahead
of time with `python -m qwen2_moe_hf.moe.extension [cpu] [cuda]`. Never needed by `pip install`;
when there is no compiler the backends that need the ops report why and `auto` uses another one.
"""

import functools
import glob
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


_cpu_module = []  # the loaded CPU extension module, once loaded


@functools.lru_cache(maxsize=None)
def load_cpu_ops():
    """Load (building if needed) the CPU ops; returns (True, "") or (False, why not). Registers
    torch.ops.qwen2_moe_hf.moe_ffn_cpu and the other CPU ops (csrc/cpu/*.cpp); the module itself (cpu_module())
    holds the cpu backend's direct entry points."""
    from . import ops  # noqa: F401  (the schemas the compiled implementations attach to)
    from ..gptq import ops as gptq_ops  # noqa: F401

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False, "no C++ compiler found (install g++ or set CXX) to build the CPU ops"
    tag, vector_flags = _cpu_flags()
    ok, why, module = _build("cpu", f"qwen2_moe_hf_cpu_{tag}_torch{_torch_tag()}",
                             sources=[os.path.join(CSRC, "cpu", name) for name in (
                                 "moe_ffn_cpu.cpp", "moe_ops_cpu.cpp", "gptq_int4_cpu.cpp")],
                             extra_cflags=["-O3", "-fopenmp", *vector_flags], extra_ldflags=["-fopenmp"],
                             is_python_module=True)
    if ok:
        _cpu_module.append(module)
    return ok, why


def cpu_module():
    """The CPU extension module (after load_cpu_ops() succeeded)."""
    return _cpu_module[0]


def _torch_tag():
    return torch.__version__.split("+")[0].replace(".", "_")


def _build(kind, name, is_python_module=False, **load_kwargs):
    """cpp_extension.load with our rules: honour QWEN2_MOE_HF_NO_EXT_BUILD, turn failures into a reason.
    -> (ok, why not, the module when is_python_module)."""
    from torch.utils import cpp_extension

    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if os.environ.get(ENV_NO_BUILD) == "1" and not os.path.isfile(os.path.join(build_dir, f"{name}.so")):
        return False, f"the {kind.upper()} ops are not built and {ENV_NO_BUILD}=1 forbids building them", None
    try:
        module = cpp_extension.load(name=name, is_python_module=is_python_module,
                                    verbose=os.environ.get("QWEN2_MOE_HF_VERBOSE_BUILD") == "1", **load_kwargs)
    except Exception as exc:  # compiler errors, missing headers or ninja: report, do not crash the model
        logger.warning("qwen2_moe_hf: building the %s ops failed: %s", kind.upper(), exc)
        return False, f"building the {kind.upper()} ops failed: {str(exc).strip().splitlines()[-1][:300]}", None
    return True, "", module


def find_cuda_home():
    """The CUDA toolkit to compile with: $CUDA_HOME / $CUDA_PATH, else a toolkit folder that holds bin/nvcc."""
    candidates = [os.environ[k] for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        # A toolkit, not just a folder with an nvcc wrapper in bin/ (e.g. /usr/local/bin/nvcc -> /usr/local).
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _nvidia_include_dirs():
    """Headers of pip's nvidia-* packages (CUDA 13 wheels put them under nvidia/cu13/include)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "include"))) + sorted(glob.glob(os.path.join(root, "*",
                                                                                                       "include")))
    return [d for d in dirs if os.path.isdir(d)]


@functools.lru_cache(maxsize=None)
def load_cuda_ops():
    """Load (building if needed) the CUDA expert-dispatch ops; returns (True, "") or (False, why not).
    Compiles for the visible GPU, or for TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") when set. A GPU is not needed to
    build or load them, only to run them."""
    from . import ops  # noqa: F401

    if torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::moe_align", "CUDA"):
        return True, ""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    home = find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home  # read once at import by torch; ours may have been found later
    os.environ.setdefault("CUDA_HOME", home)
    lib_dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib")) if os.path.isdir(d)]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return _build("cuda", f"qwen2_moe_hf_cuda_torch{_torch_tag()}",
                  sources=[os.path.join(CSRC, "cuda", "moe_ops.cu")], extra_include_paths=_nvidia_include_dirs(),
                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                  extra_ldflags=[f"-L{d}" for d in lib_dirs])[:2]


def main(argv=None):
    """Build (or load) the compiled ops ahead of time: python -m qwen2_moe_hf.moe.extension [cpu] [cuda]."""
    wanted = (argv if argv is not None else sys.argv[1:]) or ["cpu", "cuda"]
    status = 0
    for kind in wanted:
        ok, why = {"cpu": load_cpu_ops, "cuda": load_cuda_ops}[kind]()
        print(f"{kind} ops:", "built and loaded" if ok else f"unavailable: {why}")
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
