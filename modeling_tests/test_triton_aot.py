"""Every Triton kernel configuration the launchers can pick compiles for real GPUs: to cubin for sm_80 and sm_90a with
Triton's own compiler (qwen2_moe_hf/kernels/triton_aot.py), on this machine without a GPU, with no register spills,
at most 255 registers and within the table's shared-memory budget (sm90 227 KB; sm80 99 KB, see
kernels/triton_configs.py).

In CI this compiles the subset `triton_aot.variants()` describes: every configuration of every kernel on both
targets, one dtype variant per code path (bf16 for the 16-bit kernels, bf16 with fp16 scales for int4, fp32 dense
and fp32 with int4), at the real model shape: ~75 compiles, ~45 s on 2 cores. QWEN2_MOE_HF_AOT_ALL=1 compiles all
~280 (every dtype variant and a ragged shape: ~2 min on 2 cores), as `python -m qwen2_moe_hf.kernels.triton_aot
--all` does for the report in docs/dispatch.md."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e .[triton])")

from qwen2_moe_hf.kernels import triton_aot, triton_configs  # noqa: E402  (neither imports triton)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _key(kernel, gen, cls, block_m, tile):
    return kernel, gen, cls, block_m, tile


def test_the_report_enumerates_every_launchable_configuration():
    launchable = {_key(*row) for row in triton_configs.launchable()}
    for full in (False, True):
        items = triton_aot.variants(full=full)
        assert {_key(v.kernel, v.gen, v.dtype_cls, v.block_m, v.tile) for v in items} == launchable
        assert {v.gen for v in items} == {"sm80", "sm90"}
    ci, full = triton_aot.variants(), triton_aot.variants(full=True)
    assert set(ci) < set(full)
    assert {v.shape for v in full} == {"real", "ragged"} and {v.shape for v in ci} == {"real"}
    # every dtype a launcher runs: 16-bit in bf16 and fp16, int4 with fp16 or the activations' scales, fp32
    assert {(v.x, v.w, v.int4) for v in full if v.kernel == "gemm1"} == {
        ("bf16", "bf16", False), ("fp16", "fp16", False), ("fp32", "fp32", False),
        ("bf16", "fp16", True), ("bf16", "bf16", True), ("fp16", "fp16", True), ("fp32", "fp16", True),
        ("fp32", "fp32", True)}
    # the CI subset still compiles each code path: dense 16-bit, dense fp32, int4 16-bit, int4 fp32
    assert {(v.x == "fp32", v.int4) for v in ci if v.kernel == "gemm2"} == {(False, False), (True, False),
                                                                          (False, True), (True, True)}


def _row(**kw):
    row = dict(kernel="gemm1", target="sm_90a", gen="sm90", dtype_cls="16bit", x="bf16", w="bf16", int4=False,
               shape="real", config="16x64x128 w4 s4", block_m=16, block_n=64, block_k=128, num_warps=4,
               num_stages=4, smem_budget=227 * 1024, reg_limit=255, error=None, regs=100, stack=0, spill_stores=0,
               spill_loads=0, smem=100 * 1024)
    row.update(kw)
    row["ok"] = triton_aot.row_ok(row)
    return row


def test_a_row_is_ok_only_without_spills_errors_and_overflows():
    assert _row()["ok"]
    assert not _row(spill_stores=8, spill_loads=8)["ok"]
    assert not _row(smem=228 * 1024)["ok"]
    assert not _row(regs=256)["ok"]
    assert not _row(error="CompilationError: ...", regs=None, spill_stores=None, spill_loads=None, smem=None)["ok"]
    table = triton_aot.markdown([_row(), _row(x="fp16", w="fp16", regs=104), _row(shape="ragged", smem=120 * 1024),
                                 _row(gen="sm80", target="sm_80", smem_budget=99 * 1024, spill_stores=4)])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, one line per (kernel, target, class, config)
    assert "| bf16, fp16; +ragged | 104 | 0/0 | 120.0 | 227.0 | yes |" in lines[3]
    assert lines[2].endswith("| 4/0 | 100.0 | 99.0 | **NO** |")
    summary = triton_aot.summary([_row(), _row(regs=200, config="x"), _row(gen="sm80", target="sm_80")])
    assert summary["sm90"]["max_regs"] == 200 and summary["sm90"]["max_regs_at"].startswith("gemm1 x ")
    assert summary["sm80"]["rows"] == 1 and summary["sm80"]["spilling"] == 0


def test_ptxas_usage_is_read_from_ptxas_itself():
    pytest.importorskip("triton.backends.nvidia.compiler")
    ptx = """
.version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 p)
{
    .reg .b64 %rd<3>;
    .reg .f32 %f<2>;
    ld.param.u64 %rd1, [p];
    cvta.to.global.u64 %rd2, %rd1;
    mov.f32 %f1, 0f3F800000;
    st.global.f32 [%rd2], %f1;
    ret;
}
"""
    usage = triton_aot.ptxas_usage(ptx, 80)
    assert usage["regs"] > 0 and usage["spill_stores"] == usage["spill_loads"] == usage["static_smem"] == 0


def test_every_configuration_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))  # compile for real, not from a cache
    full = os.environ.get("QWEN2_MOE_HF_AOT_ALL") == "1"
    cmd = [sys.executable, "-m", "qwen2_moe_hf.kernels.triton_aot", "--json", str(out), "--quiet", "--jobs", "2"]
    proc = subprocess.run(cmd + (["--all"] if full else []), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert out.exists(), f"no report written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(triton_aot.variants(full=full))
    errors = [f"{r['kernel']} {r['target']} {r['config']} {r['x']}/{r['w']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    bad = [f"{r['kernel']} {r['target']} {r['config']} {r['x']}/{r['w']} {r['shape']}: {r['regs']} registers, "
           f"spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['smem']} B of {r['smem_budget']}"
           for r in rows if not r["ok"]]
    assert not bad, "configurations that spill or do not fit:\n" + "\n".join(bad)
    assert all(r["spill_stores"] == r["spill_loads"] == 0 and r["regs"] <= 255 for r in rows)
    assert {r["target"] for r in rows} == {"sm_80", "sm_90a"}
    assert {_key(r["kernel"], r["gen"], r["dtype_cls"], r["block_m"],
                 triton_configs.Tile(r["block_n"], r["block_k"], r["num_warps"], r["num_stages"])) for r in rows} == \
        {_key(*row) for row in triton_configs.launchable()}
    assert proc.returncode == 0, proc.stdout[-3000:]
