"""Ahead-of-time compilation of the Triton kernel family for real GPUs, on a machine without one.

Every (kernel, configuration, dtype, dense / int4) the launchers of kernels/triton_moe.py can pick
(triton_configs.launchable) is compiled by Triton's own compiler, `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 80 | 90, 32))`, to PTX and cubin for sm_80 and sm_90a. For each, ptxas (the one Triton ships
and uses, with Triton's flags) reports registers per thread and spill stores / loads; cuobjdump on Triton's own cubin
must agree on the registers and show no local memory; shared memory is what the launch requests (Triton's metadata)
plus the cubin's static shared memory (1 KB on sm_90a). A row is ok when it compiled, spills nothing, uses at most
255 registers and fits the table's shared-memory budget (sm90: 227 KB; sm80: 99 KB, so that sm86 / sm89 parts can
run the sm80 table too; A100 itself allows 163 KB).

    python -m qwen2_moe_hf.kernels.triton_aot --all        # every configuration, every dtype, markdown table
    python -m qwen2_moe_hf.kernels.triton_aot              # the CI subset (see `variants`)
    python -m qwen2_moe_hf.kernels.triton_aot --json out.json --jobs 2

Compiled at Qwen1.5-MoE-A2.7B's shape (hidden 2048, moe_intermediate 1408, top-4: H, I and TOP_K are constexpr, so
each model shape is its own specialization; these two are multiples of every BLOCK_K, so no K masks) and, with
--all, at a ragged shape (2000, 1400) that compiles the masked-K code too. Pointer arguments are compiled as
16-byte aligned (what torch allocates, and what Triton's launcher specializes on), integer arguments without
divisibility hints. Runs with TRITON_INTERPRET unset (the interpreter replaces triton.jit); the CLI removes it from
its environment before triton is imported, and the compiles run in worker processes.
"""

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

from . import triton_configs as configs
from .triton_configs import Tile

TARGETS = {"sm80": 80, "sm90": 90}
SMEM_BUDGET = {"sm80": configs.SMEM_PORTABLE_SM8X, "sm90": configs.SMEM_LIMIT["sm90"]}
SHAPES = {"real": dict(H=2048, I=1408, TOP_K=4), "ragged": dict(H=2000, I=1400, TOP_K=4)}
NUM_EXPERTS = 60


@dataclass(frozen=True)
class Variant:
    kernel: str  # gemm1 | gemm2 | gemv1 | gemv2 | int4_linear | combine
    gen: str  # sm80 | sm90
    dtype_cls: str  # 16bit | fp32 | int4 | any (combine)
    block_m: int
    tile: Tile
    x: str  # activations: bf16 | fp16 | fp32
    w: str  # dense: the weights' dtype (= x); int4: the scales' dtype
    int4: bool
    shape: str = "real"

    @property
    def config(self) -> str:
        return configs.describe(self.tile, self.block_m) if self.kernel != "combine" else \
            f"{self.tile.block_n} w{self.tile.num_warps}"


def _dtype_variants(kernel: str, dtype_cls: str, full: bool):
    """(x, w, int4) combinations a configuration runs with. Full: every one; CI: one per code path."""
    if kernel == "combine":
        return [(x, x, False) for x in (("bf16", "fp16", "fp32") if full else ("bf16", "fp32"))]
    if dtype_cls == "16bit":
        return [(x, x, False) for x in (("bf16", "fp16") if full else ("bf16",))]
    if dtype_cls == "int4":  # scales as the checkpoint stores them (fp16), or cast with the model (x's dtype)
        return [("bf16", "fp16", True), ("bf16", "bf16", True), ("fp16", "fp16", True)] if full else \
            [("bf16", "fp16", True)]
    # fp32 activations: dense fp32 weights, or 4-bit weights with fp16 (or fp32) scales
    out = [] if kernel == "int4_linear" else [("fp32", "fp32", False)]
    out += [("fp32", "fp16", True)] + ([("fp32", "fp32", True)] if full else [])
    return out


def variants(full: bool = False, tables=None) -> List[Variant]:
    """Every launchable configuration (triton_configs.launchable) with its dtype variants, at the real shape; with
    `full` also every dtype variant and the ragged shape. The CI subset (full=False) keeps every configuration of
    every kernel on both targets, with one dtype variant per code path: bf16 for 16-bit (fp16 compiles the same
    code in another type), bf16 activations with fp16 scales for int4, fp32 dense and fp32-with-int4."""
    out = []
    for kernel, gen, cls, block_m, tile in configs.launchable(tables):
        for x, w, int4 in _dtype_variants(kernel, cls, full):
            out.append(Variant(kernel, gen, cls, block_m, tile, x, w, int4))
            if full and kernel not in ("combine", "int4_linear"):
                out.append(Variant(kernel, gen, cls, block_m, tile, x, w, int4, "ragged"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Compiling one variant (in a worker: imports triton)


def _source(v: Variant):
    import triton.language as tl
    from triton.compiler import ASTSource

    from . import triton_moe as tm

    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    x, w = "*" + v.x, "*" + v.w
    shape = SHAPES[v.shape]
    precision = "ieee" if v.x == "fp32" else "tf32"
    moe = dict(H=shape["H"], I=shape["I"], INT4=v.int4, ZERO_OFFSET=1 if v.int4 else 0, W_DTYPE=tl_dtype[v.w])
    t = v.tile
    if v.kernel == "gemm1":
        fn, sig = tm._gemm1, dict(x_ptr=x, table="*i64", act_ptr=x, sorted_slots="*i32", block_experts="*i32",
                                  num_slots="i32", num_experts="i32")
        consts = dict(moe, TOP_K=shape["TOP_K"], DOT_PRECISION=precision, BLOCK_M=v.block_m, BLOCK_N=t.block_n,
                      BLOCK_K=t.block_k)
    elif v.kernel == "gemm2":
        fn, sig = tm._gemm2, dict(act_ptr=x, table="*i64", weights_ptr=x, y_ptr=x, sorted_slots="*i32",
                                  block_experts="*i32", num_slots="i32", num_experts="i32")
        consts = dict(moe, DOT_PRECISION=precision, BLOCK_M=v.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k)
    elif v.kernel == "gemv1":
        fn, sig = tm._decode_gemm1, dict(x_ptr=x, table="*i64", ids_ptr="*i64", act_ptr=x, num_experts="i32")
        consts = dict(moe, TOP_K=shape["TOP_K"], BLOCK_N=t.block_n, BLOCK_K=t.block_k)
    elif v.kernel == "gemv2":
        fn, sig = tm._decode_gemm2, dict(act_ptr=x, table="*i64", ids_ptr="*i64", weights_ptr=x, y_ptr=x,
                                         num_experts="i32")
        consts = dict(moe, BLOCK_N=t.block_n, BLOCK_K=t.block_k)
    elif v.kernel == "int4_linear":
        fn, sig = tm._int4_linear, dict(x_ptr=x, qw="*i32", qz="*i32", sc=w, gi="*i32", bias_ptr=x, y_ptr=x,
                                        M="i32", N="i32", K="i32")
        consts = dict(ZERO_OFFSET=1, HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_M=v.block_m, BLOCK_N=t.block_n,
                      BLOCK_K=t.block_k)
    elif v.kernel == "combine":
        fn, sig = tm._combine, dict(y_ptr=x, ids_ptr="*i64", out_ptr=x, num_experts="i32")
        consts = dict(H=shape["H"], TOP_K=shape["TOP_K"], BLOCK_H=t.block_n)
    else:
        raise ValueError(f"unknown kernel {v.kernel!r}")
    aligned = [name for name, ty in sig.items() if ty.startswith("*")]
    if v.kernel == "int4_linear":
        aligned += ["N", "K"]  # real layers' sizes are multiples of 16; M (rows) is not specialized
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    signature = dict(sig, **{name: "constexpr" for name in consts})
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def ptxas_usage(ptx: str, capability: int) -> Dict[str, int]:
    """Registers, stack, spills and static shared memory of one PTX module, from `ptxas -v` run as Triton runs it
    (its bundled ptxas, -lineinfo, --regAllocOptLevel=2, --gpu-name sm_80 / sm_90a)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", out],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    usage = {}
    for key, pattern in _PTXAS_RE.items():
        values = [int(m) for m in pattern.findall(proc.stderr)]
        usage[key] = max(values) if values else 0
    if not _PTXAS_RE["regs"].search(proc.stderr):
        raise RuntimeError(f"no register count in ptxas output: {proc.stderr[-2000:]}")
    return usage


_CUBIN_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack, static shared memory and local memory of the compiled kernel itself, from `cuobjdump
    --dump-resource-usage` (Triton's bundled one). sm_90a cubins carry 1 KB of static shared memory that ptxas -v
    does not print; Triton's launcher allows (opt-in limit - static) bytes of dynamic shared memory."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
    match = _CUBIN_RE.search(proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"cuobjdump failed: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    regs, stack, shared, local = map(int, match.groups())
    return dict(cubin_regs=regs, cubin_stack=stack, cubin_static_smem=shared, cubin_local=local)


def compile_variant(v: Variant) -> Dict:
    """Compile one variant for its target; a report row (error set when it failed)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget

    capability = TARGETS[v.gen]
    row = dict(kernel=v.kernel, target=f"sm_{capability}" + ("a" if capability >= 90 else ""), gen=v.gen,
               dtype_cls=v.dtype_cls, x=v.x, w=v.w, int4=v.int4, shape=v.shape, config=v.config,
               block_m=v.block_m, **asdict(v.tile), smem_budget=SMEM_BUDGET[v.gen], reg_limit=configs.MAX_REGS,
               error=None)
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(v), target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=v.tile.num_warps, num_stages=v.tile.num_stages,
                                               enable_fp_fusion=True))
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        usage = ptxas_usage(compiled.asm["ptx"], capability)
        binary = cubin_usage(compiled.asm["cubin"])
        if binary["cubin_regs"] != usage["regs"]:
            raise RuntimeError(f"ptxas -v says {usage['regs']} registers, the cubin {binary['cubin_regs']}")
        # smem: the dynamic shared memory the launch requests (Triton's metadata) plus the cubin's static
        row.update(usage, **binary, dynamic_smem=int(compiled.metadata.shared),
                   smem=int(compiled.metadata.shared) + max(usage["static_smem"], binary["cubin_static_smem"]),
                   cubin_bytes=len(compiled.asm["cubin"]))
    except Exception as e:  # noqa: BLE001  (the row reports it; the caller fails on it)
        row.update(regs=None, stack=None, spill_stores=None, spill_loads=None, smem=None,
                   error=f"{type(e).__name__}: {str(e)[-1500:]}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["ok"] = row_ok(row)
    return row


def row_ok(row: Dict) -> bool:
    return (row["error"] is None and row["spill_stores"] == 0 and row["spill_loads"] == 0
            and not row.get("cubin_local") and row["regs"] <= row["reg_limit"] and row["smem"] <= row["smem_budget"])


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, stated (silences a warning)


def compile_all(items: Iterable[Variant], jobs: Optional[int] = None, progress=None) -> List[Dict]:
    """Compile every variant in `jobs` worker processes (default: the CPUs this process may use, at most 4).
    Workers are spawned with TRITON_INTERPRET removed, so this can run from an interpreted test session."""
    items = list(items)
    jobs = jobs or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
            rows = []
            for i, row in enumerate(pool.map(compile_variant, items, chunksize=1)):
                rows.append(row)
                if progress:
                    progress(i + 1, len(items), row)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def summary(rows: List[Dict]) -> Dict[str, Dict]:
    """Per target: rows, failures, max registers, rows that spill, max shared memory (and which kernel)."""
    out = {}
    for gen in TARGETS:
        rs = [r for r in rows if r["gen"] == gen]
        good = [r for r in rs if r["error"] is None]
        top_regs = max(good, key=lambda r: r["regs"], default=None)
        top_smem = max(good, key=lambda r: r["smem"], default=None)

        def where(r):
            return r and f"{r['kernel']} {r['config']} {r['x']}" + (f"/int4:{r['w']}" if r["int4"] else "")

        out[gen] = dict(
            rows=len(rs), errors=sum(r["error"] is not None for r in rs), not_ok=sum(not r["ok"] for r in rs),
            spilling=sum(bool(r["spill_stores"] or r["spill_loads"]) for r in good),
            max_regs=top_regs and top_regs["regs"], max_regs_at=where(top_regs),
            max_smem=top_smem and top_smem["smem"], max_smem_at=where(top_smem), smem_budget=SMEM_BUDGET[gen])
    return out


def _kb(b):
    return "—" if b is None else f"{b / 1024:.1f}"


def markdown(rows: List[Dict], header: bool = True) -> str:
    """The report as a markdown table: one line per (kernel, target, dtype class, configuration); the dtype variants
    and shapes of a line are folded into it (registers and shared memory: the largest; spills: the sum). "compiled
    as": activations, or activations/int4:scales for 4-bit weights; "+ragged": also at the ragged shape."""
    groups: Dict[tuple, List[Dict]] = {}
    order = {k: i for i, k in enumerate(("gemm1", "gemm2", "gemv1", "gemv2", "int4_linear", "combine"))}
    for r in rows:
        groups.setdefault((r["kernel"], r["gen"], r["dtype_cls"], r["block_m"], r["block_n"], r["block_k"],
                           r["num_warps"], r["num_stages"]), []).append(r)
    lines = []
    if header:
        lines += ["| kernel | target | class | config (BM x BN x BK, warps, stages) | compiled as | regs | spills "
                  "(st/ld B) | smem KB | budget KB | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k[1], k[2], k[3], k[4], k[5], k[6], k[7])):
        rs = groups[key]
        good = [r for r in rs if r["error"] is None]
        dtypes = sorted({f"{r['x']}/int4:{r['w']}" if r["int4"] else r["x"] for r in rs})
        if any(r["shape"] != "real" for r in rs):
            dtypes[-1] += "; +ragged"
        regs = max((r["regs"] for r in good), default=None)
        spill_st = sum(r["spill_stores"] for r in good)
        spill_ld = sum(r["spill_loads"] for r in good)
        smem = max((r["smem"] for r in good), default=None)
        ok = "yes" if all(r["ok"] for r in rs) else "**NO**"
        lines.append(f"| {key[0]} | {rs[0]['target']} | {key[2]} | {rs[0]['config']} | {', '.join(dtypes)} | "
                     f"{regs} | {spill_st}/{spill_ld} | {_kb(smem)} | {_kb(rs[0]['smem_budget'])} | {ok} |")
    return "\n".join(lines)


def provenance() -> Dict[str, str]:
    import triton

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(date=datetime.date.today().isoformat(), commit=commit, triton=triton.__version__)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen2_moe_hf.kernels.triton_aot",
                                     description="Compile every Triton kernel configuration to cubin for sm_80 and "
                                                 "sm_90a (no GPU needed) and report registers, spills, shared memory.")
    parser.add_argument("--all", action="store_true", help="every dtype variant and the ragged shape (else the CI "
                                                           "subset)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs, at most 4)")
    parser.add_argument("--json", default=None, help="write the rows (and summary) as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    items = variants(full=args.all)
    start = time.perf_counter()

    def progress(i, n, row):
        if not args.quiet:
            status = "ok" if row["ok"] else ("ERROR" if row["error"] else "NOT OK")
            print(f"[{i}/{n}] {row['kernel']} {row['target']} {row['config']} {row['x']}"
                  f"{'/int4:' + row['w'] if row['int4'] else ''} {row['shape']}: regs {row['regs']} spills "
                  f"{row['spill_stores']}/{row['spill_loads']} smem {row['smem']} {status}", file=sys.stderr)

    rows = compile_all(items, args.jobs, progress)
    elapsed = time.perf_counter() - start
    info = provenance()
    summ = summary(rows)
    print(f"Triton AOT report: {info['date']}, commit {info['commit']}, triton {info['triton']}, "
          f"{len(rows)} compiles ({'all variants' if args.all else 'CI subset'}) in {elapsed:.0f} s\n")
    print(markdown(rows))
    print()
    for gen, s in summ.items():
        print(f"- {gen}: {s['rows']} compiles, {s['errors']} errors, {s['spilling']} spilling, max registers "
              f"{s['max_regs']} ({s['max_regs_at']}), max shared memory {_kb(s['max_smem'])} KB ({s['max_smem_at']}) "
              f"of {_kb(s['smem_budget'])} KB")
    for r in rows:
        if r["error"]:
            print(f"\nERROR {r['kernel']} {r['target']} {r['config']} {r['x']} {r['w']} {r['shape']}:\n{r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(provenance=info, seconds=round(elapsed, 1), summary=summ, rows=rows), f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
