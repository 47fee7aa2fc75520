"""The extension build never hangs and never breaks a forward: a stale lock (a builder that was killed), an unusable
build folder, a missing compiler or ninja, or another builder that takes too long give one warning naming the cause
and the torch path within seconds; two processes building at once both end up with a working module.

Each case runs in a child process with a time limit. Most build a tiny extension (a plain Python module, compiled
in about a second) through the same builder as the real ops (extension.build_extension); the last ones use the
real CPU ops and a model forward."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from qwen2_moe_hf.kernels import build as extension

TINY_NAME = "qwen2_moe_hf_build_probe"


def _run(code, env=None, timeout=120):
    """Run python `code` in a child; -> (returncode, stdout, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def _tiny_build(tmp_path, name=TINY_NAME, prelude=""):
    """Child code that builds the tiny module through build_extension and prints ok / the reason."""
    source = tmp_path / f"{name}.cpp"
    source.write_text(textwrap.dedent(f"""
        #include <Python.h>
        static PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{name}", nullptr, -1, nullptr}};
        PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&def); }}
    """))
    return f"""
        {prelude}
        import logging
        logging.basicConfig(level=logging.WARNING)
        from qwen2_moe_hf.kernels.build import build_extension
        ok, why, module = build_extension("cpu", "{name}", sources=[{str(source)!r}], is_python_module=True)
        print("RESULT", ok, module.__name__ if ok else why, flush=True)
    """


def _result(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return line.split(" ", 2)[1] == "True", line.split(" ", 2)[2]


@pytest.fixture
def ext_dir(tmp_path):
    return {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}


def test_a_stale_lock_left_by_a_killed_build_is_removed(tmp_path, ext_dir):
    build_dir = tmp_path / "ext" / TINY_NAME
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # torch's baton, as a killed build leaves it
    rc, out, err, seconds = _run(_tiny_build(tmp_path), ext_dir)
    assert rc == 0 and _result(out) == (True, TINY_NAME), err
    assert "removing the stale build lock" in err
    assert not (build_dir / "lock").exists()


def test_an_unusable_build_folder_gives_one_warning_and_no_build(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, out, err, seconds = _run(_tiny_build(tmp_path), {"TORCH_EXTENSIONS_DIR": str(blocker / "ext")})
    ok, why = _result(out)
    assert rc == 0 and not ok and "is not usable" in why and "TORCH_EXTENSIONS_DIR" in why
    assert err.count("are unavailable") == 1 and seconds < 60


def test_a_missing_compiler_is_named(tmp_path, ext_dir):
    rc, out, err, _ = _run(_tiny_build(tmp_path), {**ext_dir, "CXX": "/nonexistent/c++"})
    assert rc == 0 and _result(out) == (False, "the C++ compiler CXX=/nonexistent/c++ was not found")
    assert err.count("are unavailable") == 1


def _compiler_only_path(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with a compiler and nothing else (no system ninja)
    bin_dir.mkdir()
    os.symlink(shutil.which("c++"), bin_dir / "c++")
    return str(bin_dir)


def test_a_missing_ninja_is_named(tmp_path, ext_dir):
    no_package = "import sys; sys.modules['ninja'] = None  # as if the ninja package were not installed"
    rc, out, err, _ = _run(_tiny_build(tmp_path, prelude=no_package), {**ext_dir, "PATH": _compiler_only_path(tmp_path)})
    assert rc == 0 and _result(out) == (False, "ninja is not installed (pip install ninja)")
    assert err.count("are unavailable") == 1 and "pip install ninja" in err


def _path_without_ninja(tmp_path):
    """A PATH with every program of this one (compiler, assembler, linker...) except any ninja."""
    farm = tmp_path / "no_ninja_bin"
    farm.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = farm / name
            if name != "ninja" and not os.path.lexists(target):
                os.symlink(os.path.join(folder, name), target)
    return str(farm)


def test_the_ninja_package_serves_when_its_venv_is_not_activated(tmp_path, ext_dir):
    # `.venv/bin/python` run without activating the venv: the ninja package (a dependency) is installed, but its
    # binary's folder is not on PATH, and there is no system ninja.
    pytest.importorskip("ninja", reason="the ninja package is a dependency; this environment lacks it")
    path = _path_without_ninja(tmp_path)
    assert shutil.which("ninja", path=path) is None
    rc, out, err, _ = _run(_tiny_build(tmp_path), {**ext_dir, "PATH": path})
    assert rc == 0 and _result(out) == (True, TINY_NAME), err


@pytest.mark.skipif(extension.fcntl is None, reason="builds are locked with flock, which this platform lacks")
def test_a_builder_that_takes_too_long_is_given_up_on_in_time(tmp_path, ext_dir):
    import fcntl

    build_dir = tmp_path / "ext" / TINY_NAME
    build_dir.mkdir(parents=True)
    with open(build_dir / extension.LOCK_NAME, "w") as held:  # another (live) builder holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, out, err, seconds = _run(_tiny_build(tmp_path), {**ext_dir, extension.ENV_BUILD_TIMEOUT: "2"})
    ok, why = _result(out)
    assert rc == 0 and not ok and "another process has been building" in why and seconds < 60


def test_two_processes_building_at_once_both_get_a_working_module(tmp_path, ext_dir):
    code = _tiny_build(tmp_path)
    env = {**os.environ, **ext_dir}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and _result(out) == (True, TINY_NAME), err


# ----------------------------------------------------------------------------------------------- the real ops

FORWARD = """
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, {tests!r})
    import torch, helpers
    model = helpers.build_model("gqa")
    with torch.no_grad():
        for _ in range(3):
            logits = model(torch.randint(1, 128, (1, 5))).logits
    from qwen2_moe_hf.kernels.build import load_cpu_ops
    print("RESULT", *load_cpu_ops(), bool(torch.isfinite(logits).all()), flush=True)
"""


def test_a_forward_falls_back_to_torch_when_the_ops_cannot_be_built(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = FORWARD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    rc, out, err, seconds = _run(code, {"TORCH_EXTENSIONS_DIR": str(blocker / "ext"),
                                        "QWEN2_MOE_HF_REQUIRE_CPU_OPS": "0"})
    assert rc == 0, err
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert line.startswith("RESULT False the build folder") and line.endswith("True")
    assert err.count("the CPU ops are unavailable") == 1  # one warning, however many forwards
    assert "torch path" in err


def test_a_stale_lock_in_the_real_build_folder_does_not_hang_a_forward():
    ok, why = extension.load_cpu_ops()  # built (or loaded) here first
    if not ok:
        pytest.skip(f"CPU ops unavailable: {why}")
    from torch.utils import cpp_extension

    name = extension.cpu_build()[0]
    baton = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    open(baton, "w").close()
    try:
        code = FORWARD.format(tests=os.path.dirname(os.path.abspath(__file__)))
        rc, out, err, seconds = _run(code, timeout=300)
        assert rc == 0, err
        assert next(line for line in out.splitlines() if line.startswith("RESULT ")) == "RESULT True  True"
        assert not os.path.exists(baton)
    finally:
        if os.path.exists(baton):
            os.remove(baton)


def _cpuinfo_flags():
    with open("/proc/cpuinfo") as f:
        return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


def test_the_build_is_picked_for_the_cpu_and_never_beyond_it(monkeypatch):
    """The flags follow /proc/cpuinfo (avx512vnni needs AVX-512 F/BW/VL/VNNI and AVX2, avx512bf16 that and AVX-512
    BF16; avx2 needs AVX2, FMA, F16C); QWEN2_MOE_HF_CPU_ISA asks for less, never more, and a value it does not know
    is an error naming it."""
    flags = _cpuinfo_flags()
    has_avx2 = {"avx2", "fma", "f16c"} <= flags
    expected = "avx512vnni" if has_avx2 and extension.AVX512_VNNI <= flags else "avx2" if has_avx2 else "generic"
    if expected == "avx512vnni" and "avx512_bf16" in flags:
        expected = "avx512bf16"
    monkeypatch.delenv(extension.ENV_ISA, raising=False)
    tag, cflags = extension._cpu_flags()
    assert tag == expected
    assert ("-mavx512vnni" in cflags) == tag.startswith("avx512") and ("-mavx512bf16" in cflags) == (tag == "avx512bf16")
    assert extension.cpu_build()[0].startswith(f"qwen2_moe_hf_cpu_{tag}_")  # one cache entry per build kind
    monkeypatch.setenv(extension.ENV_ISA, "avx512vnni")  # the VNNI build without BF16, on a machine with it
    assert extension._cpu_flags()[0] == expected.replace("avx512bf16", "avx512vnni")
    monkeypatch.setenv(extension.ENV_ISA, "avx2")
    assert extension._cpu_flags()[0] == ("avx2" if has_avx2 else "generic")
    monkeypatch.setenv(extension.ENV_ISA, "generic")
    assert extension._cpu_flags() == ("generic", [])
    monkeypatch.setenv(extension.ENV_ISA, "avx1024")
    with pytest.raises(ValueError, match="QWEN2_MOE_HF_CPU_ISA='avx1024': expected avx512, avx512vnni, avx2 or generic"):
        extension._cpu_flags()


@pytest.mark.parametrize("flags, own, narrower", [
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}, "avx512bf16",
     ["avx512vnni", "avx2", "generic"]),  # Zen 4, Sapphire Rapids
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "avx512vnni", ["avx2", "generic"]),
    ({"avx2", "fma", "f16c", "avx512f"}, "avx2", ["generic"]),  # AVX-512 without VNNI builds for AVX2
    ({"avx2", "fma", "f16c"}, "avx2", ["generic"]),  # Zen 2/3
    ({"sse4_2"}, "generic", []),
])
def test_narrower_builds_are_every_build_below_the_machines_own(monkeypatch, flags, own, narrower):
    """What CI's narrower-isa stage tests beside the machine's own build: each distinct build below it, widest first,
    as QWEN2_MOE_HF_CPU_ISA values that give those builds (whatever the environment asks for now)."""
    monkeypatch.setattr(extension, "_machine_flags", lambda: set(flags))
    monkeypatch.setenv(extension.ENV_ISA, "generic")
    assert extension._cpu_flags("avx512")[0] == own
    assert extension.narrower_builds() == narrower
    tags = [extension._cpu_flags(isa)[0] for isa in narrower]
    assert len(set(tags)) == len(tags) and own not in tags
    assert set(tags) | {own} == {extension._cpu_flags(isa)[0] for isa in extension.ISA_CHOICES}
