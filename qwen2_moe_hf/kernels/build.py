"""Building and loading the C++ ops in qwen2_moe_hf/kernels/csrc with torch.utils.cpp_extension.

Built on first use (JIT) and cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), or ahead
of time with `qwen2-moe-hf build-ext [cpu] [cuda]`. Never needed by `pip install`.

A build never hangs and never breaks a forward: every reason the ops cannot be had (no compiler, no ninja, an
unusable build folder, a compile error, another process building for longer than QWEN2_MOE_HF_BUILD_TIMEOUT
seconds) becomes one warning naming the cause, and the model runs on the torch path. Builders take an exclusive
lock (flock) on the build folder, which the kernel releases when a builder dies; holding it, a `lock` file that
torch's own baton left behind (a build that was killed) is stale and is removed, where torch would wait for it
forever. Two processes building at once: the second waits for the first, then loads what it built.

QWEN2_MOE_HF_SANITIZE=1 builds the CPU ops with AddressSanitizer and UBSan (a build of its own, -O1): for tests,
in a process started with the sanitizer runtime and libstdc++ preloaded (ASan must come first, and its
__cxa_throw interceptor needs libstdc++ loaded when it starts; `modeling_tests/run_all.sh sanitize` does this):
LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)".
"""

import contextlib
import functools
import glob
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterator, List, Optional, Set, Tuple

import torch
from torch.utils import cpp_extension

from . import ops  # noqa: F401  (the schemas the compiled implementations attach to)

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked
    fcntl = None

logger = logging.getLogger("qwen2_moe_hf")

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
ENV_NO_BUILD = "QWEN2_MOE_HF_NO_EXT_BUILD"  # 1: never compile; use only what is already built
ENV_SANITIZE = "QWEN2_MOE_HF_SANITIZE"  # 1: the CPU ops with AddressSanitizer + UBSan (tests only)
ENV_BUILD_TIMEOUT = "QWEN2_MOE_HF_BUILD_TIMEOUT"  # seconds to wait for another process's build (default 900)
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
LOCK_NAME = "qwen2_moe_hf.lock"  # ours, held with flock while building or loading
TORCH_BATON = "lock"  # torch's FileBaton file in the build folder

Status = Tuple[bool, str]


# AVX-512 with VNNI (and the BW / VL parts the kernels' masked loads use): the int4 kernels' integer dot products
# (int4_vnni.h); with AVX-512 BF16 too, the bf16 expert GEMMs' vdpbf16ps kernel (bf16_dot.h). Everything else stays
# the AVX2 code, which these CPUs also run.
AVX512_VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
ENV_ISA = "QWEN2_MOE_HF_CPU_ISA"  # avx512 | avx512vnni | avx2 | generic: build for less than the machine has (tests)


ISA_CHOICES = ("avx512", "avx512vnni", "avx2", "generic")  # widest first


def _machine_flags() -> Set[str]:
    """The CPU's flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _cpu_flags(wanted: Optional[str] = None) -> Tuple[str, List[str]]:
    """Vector flags this machine runs, picked at build time: AVX2 + FMA + F16C when present (+ AVX-512 VNNI when
    present too, + AVX-512 BF16 on top of that when present), else portable code. QWEN2_MOE_HF_CPU_ISA (or
    `wanted`) asks for less (never more than the CPU has)."""
    flags = _machine_flags()
    if wanted is None:
        wanted = os.environ.get(ENV_ISA, "avx512")
    if wanted not in ISA_CHOICES:
        raise ValueError(f"{ENV_ISA}={wanted!r}: expected avx512, avx512vnni, avx2 or generic")
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if wanted.startswith("avx512") and {"avx2", "fma", "f16c"} <= flags and AVX512_VNNI <= flags:
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
        if wanted == "avx512" and "avx512_bf16" in flags:
            return "avx512bf16", avx512 + ["-mavx512bf16"]
        return "avx512vnni", avx512
    if wanted != "generic" and {"avx2", "fma", "f16c"} <= flags:
        return "avx2", avx2
    return "generic", []


def narrower_builds() -> List[str]:
    """The QWEN2_MOE_HF_CPU_ISA values whose builds are narrower than this machine's own, one per distinct build,
    widest first (on an AVX-512 BF16 machine: avx512vnni, avx2, generic; on an AVX2-only one: generic). CI runs the
    kernels' tests on each of them too: a machine tests its own kernels and the ones the other machines get."""
    seen = {_cpu_flags("avx512")[0]}
    narrower = []
    for wanted in ISA_CHOICES[1:]:
        tag = _cpu_flags(wanted)[0]
        if tag not in seen:
            seen.add(tag)
            narrower.append(wanted)
    return narrower


def sanitized() -> bool:
    """Whether this process builds and loads the sanitizer build of the CPU ops."""
    return os.environ.get(ENV_SANITIZE) == "1"


_cpu_module = []  # the loaded CPU extension module, once loaded


@functools.lru_cache(maxsize=None)
def load_cpu_ops() -> Status:
    """Load (building if needed) the CPU ops; returns (True, "") or (False, why not). Registers
    torch.ops.qwen2_moe_hf.moe_ffn_cpu and the other CPU ops (csrc/cpu/*.cpp); the module itself (cpu_module())
    holds the cpu backend's direct entry points. When they cannot be had, warns once, naming the cause."""
    name, cflags, ldflags = cpu_build()
    if sanitized() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # Loading an ASan-built library into a process without the runtime preloaded kills the process.
        return _unavailable("cpu", f"{ENV_SANITIZE}=1 needs the ASan runtime preloaded (LD_PRELOAD=\"$(c++ "
                                   "-print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)\")")[:2]
    ok, why, module = build_extension(
        "cpu", name,
        sources=[os.path.join(CSRC, "cpu", n) for n in ("moe_ffn_cpu.cpp", "moe_ops_cpu.cpp", "gptq_int4_cpu.cpp",
                                                           "decode_cpu.cpp")],
        extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=True)
    if ok:
        _cpu_module.append(module)
    return ok, why


def cpu_build() -> Tuple[str, List[str], List[str]]:
    """(extension name, compile flags, link flags) of the CPU ops for this machine and mode."""
    tag, flags = _cpu_flags()
    name = f"qwen2_moe_hf_cpu_{tag}_torch{_torch_tag()}"
    if sanitized():
        return (name + "_asan_ubsan", ["-O1", "-g", "-fopenmp", *flags, *SANITIZE_FLAGS],
                ["-fopenmp", "-fsanitize=address,undefined"])
    return name, ["-O3", "-fopenmp", *flags], ["-fopenmp"]


def cpu_module() -> Any:
    """The CPU extension module (after load_cpu_ops() succeeded)."""
    return _cpu_module[0]


def loaded_cpu_module() -> Optional[Any]:
    """The CPU extension module if this process has loaded it, else None (never starts a build)."""
    return _cpu_module[0] if _cpu_module else None


def _torch_tag() -> str:
    return torch.__version__.split("+")[0].replace(".", "_")


_FALLBACK = {"cpu": "the MoE layers and GPTQ linears run on the torch path instead (correct, slower)",
             "cuda": "GPU routing and Triton's align use torch ops instead (correct, a few more launches)"}


def _unavailable(kind: str, why: str) -> Tuple[bool, str, None]:
    logger.warning("qwen2_moe_hf: the %s ops are unavailable (%s); %s", kind.upper(), why,
                   _FALLBACK.get(kind, "the torch path runs instead"))
    return False, why, None


def _missing_tool() -> Optional[str]:
    """Why the build cannot start for lack of a tool, or None."""
    cxx = os.environ.get("CXX")
    if cxx:
        if shutil.which(cxx) is None:
            return f"the C++ compiler CXX={cxx} was not found"
    elif shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler found (install g++, or set CXX)"
    if shutil.which("ninja") is None and not _ninja_from_package():
        return "ninja is not installed (pip install ninja)"
    return None


def _ninja_from_package() -> bool:
    """Put the `ninja` PyPI package's binary on PATH, if that package is installed. It is a dependency of ours, but
    its binary lands in the environment's bin folder, which is not on PATH when that environment's python is run
    without activating it (`.venv/bin/python`, `.venv/bin/qwen2-moe-hf`); torch's builder calls `ninja` by name."""
    try:
        import ninja
    except ImportError:
        return False
    folder = getattr(ninja, "BIN_DIR", None)
    if not folder or not os.path.isfile(os.path.join(folder, "ninja")):
        return False
    os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


@contextlib.contextmanager
def _build_lock(build_dir: str, timeout: float) -> Iterator[None]:
    """Exclusive flock on build_dir/qwen2_moe_hf.lock, waiting up to `timeout` s; raises TimeoutError."""
    if fcntl is None:
        yield
        return
    fd = os.open(os.path.join(build_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building in {build_dir} for more than "
                                       f"{timeout:.0f} s ({ENV_BUILD_TIMEOUT})") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def build_extension(kind: str, name: str, is_python_module: bool = False,
                    **load_kwargs: Any) -> Tuple[bool, str, Any]:
    """cpp_extension.load with our rules: honour QWEN2_MOE_HF_NO_EXT_BUILD, never hang on a stale lock, turn every
    failure into one warning and a reason. -> (ok, why not, the module when is_python_module)."""
    missing = _missing_tool()
    try:
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        if not os.access(build_dir, os.W_OK):
            raise PermissionError(f"{build_dir} is not writable")
    except OSError as exc:
        root = os.environ.get("TORCH_EXTENSIONS_DIR", "the default folder")
        return _unavailable(kind, f"the build folder under {root} is not usable ({exc}); set TORCH_EXTENSIONS_DIR "
                                  "to a writable folder")
    built = os.path.isfile(os.path.join(build_dir, f"{name}.so"))
    if os.environ.get(ENV_NO_BUILD) == "1" and not built:
        logger.info("qwen2_moe_hf: the %s ops are not built and %s=1 forbids building them", kind.upper(),
                    ENV_NO_BUILD)
        return False, f"the {kind.upper()} ops are not built and {ENV_NO_BUILD}=1 forbids building them", None
    if missing is not None:
        return _unavailable(kind, missing)
    timeout = float(os.environ.get(ENV_BUILD_TIMEOUT, "900"))
    try:
        with _build_lock(build_dir, timeout):
            baton = os.path.join(build_dir, TORCH_BATON)
            if fcntl is not None and os.path.exists(baton):
                # Every builder holds our lock; we hold it now, so this baton's builder is gone.
                logger.warning("qwen2_moe_hf: removing the stale build lock %s (a build of the %s ops was killed)",
                               baton, kind.upper())
                os.remove(baton)
            module = cpp_extension.load(name=name, build_directory=build_dir, is_python_module=is_python_module,
                                        verbose=os.environ.get("QWEN2_MOE_HF_VERBOSE_BUILD") == "1", **load_kwargs)
    except Exception as exc:  # compiler errors, missing headers, timeouts: report, do not break the model
        text = str(exc).strip().splitlines()
        return _unavailable(kind, f"building them failed: {(text[-1] if text else type(exc).__name__)[:300]}")
    return True, "", module


def find_cuda_home() -> Optional[str]:
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


def _nvidia_include_dirs() -> List[str]:
    """Headers of pip's nvidia-* packages (CUDA 13 wheels put them under nvidia/cu13/include)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += (sorted(glob.glob(os.path.join(root, "cu*", "include")))
                 + sorted(glob.glob(os.path.join(root, "*", "include"))))
    return [d for d in dirs if os.path.isdir(d)]


@functools.lru_cache(maxsize=None)
def load_cuda_ops() -> Status:
    """Load (building if needed) the CUDA expert-dispatch ops; returns (True, "") or (False, why not).
    Compiles for the visible GPU, or for TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") when set. A GPU is not needed to
    build or load them, only to run them."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::moe_align", "CUDA"):
        return True, ""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    home = find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    cpp_extension.CUDA_HOME = home  # read once at import by torch; ours may have been found later
    os.environ.setdefault("CUDA_HOME", home)
    lib_dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib")) if os.path.isdir(d)]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return build_extension("cuda", f"qwen2_moe_hf_cuda_torch{_torch_tag()}",
                           sources=[os.path.join(CSRC, "cuda", "moe_ops.cu")],
                           extra_include_paths=_nvidia_include_dirs(), extra_cflags=["-O3"],
                           extra_cuda_cflags=["-O3", "-lineinfo"], extra_ldflags=[f"-L{d}" for d in lib_dirs])[:2]


def main(argv: Optional[List[str]] = None) -> int:
    """Build (or load) the compiled ops ahead of time: qwen2-moe-hf build-ext [cpu] [cuda]."""
    wanted = (argv if argv is not None else sys.argv[1:]) or ["cpu", "cuda"]
    status = 0
    for kind in wanted:
        ok, why = {"cpu": load_cpu_ops, "cuda": load_cuda_ops}[kind]()
        print(f"{kind} ops:", "built and loaded" if ok else f"unavailable: {why}")
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
