"""Tile configurations of the Triton kernel family (kernels/triton_moe.py): our own table, keyed by GPU generation,
dtype class and slots per expert, and the pure functions the launchers pick from it with.

No triton import here: the table, the pick functions and the tuner's table writer are plain Python, testable on any
machine (the AOT compiler, kernels/triton_aot.py, and the launchers import triton themselves).

Where the numbers come from (facts carried over from vLLM's fused-MoE Triton kernels, not its code):
- vLLM's default when no tuned file exists: BLOCK_M 16, BLOCK_N 32, BLOCK_K 64 while M (tokens) <= E (experts), else
  64 x 64 x 32 with GROUP_SIZE_M 8; Triton's defaults of 4 warps and 3 stages. For its Triton GPTQ/AWQ (int4 w4a16)
  path: BLOCK_M 16 / 32 / 64 at M <= 20 / <= 40 / more, BLOCK_N 32 x BLOCK_K 64 at one token, else 64 x 32.
- vLLM's tuned tables for the nearest shapes to ours (64 experts, N = 1280, bf16; we have 60 experts, N = 1408,
  hidden 2048, top-4): on H200 BLOCK_M 16 with 64-128 x 64-128 tiles, 4 warps, 2-5 stages up to ~8 slots per
  expert; BLOCK_M 32, 128 x 128, 4 warps, 3 stages around 12-16; 64 x 64 x 64 around 32; 128 x 256 x 64, 8 warps,
  4 stages from ~64 on. On A100 the same up to 16 slots, then 64 x 256 x 128 with 8 warps, and 128 x 128 x 64 with
  4 warps, 3 stages at the largest batches. GROUP_SIZE_M is 1 in most tuned entries.
Adapted to our kernels:
- vLLM's first GEMM runs over the fused [2I, H] gate_up weight; ours keeps gate and up as two accumulators of
  BLOCK_N columns each, so our GEMM1 BLOCK_N is half of vLLM's for the same registers and shared memory.
- the key is slots per expert (tokens x top_k / experts, what a row block fills), not tokens: the same tokens fill
  blocks very differently with 8 or 60 experts.
- no GROUP_SIZE_M: the grid is (row blocks, column tiles) with the row blocks fastest, so all row blocks of one
  expert run back to back on each weight tile (the weights are what is large), and the tuned tables above mostly
  chose 1 anyway.
- fp32 (tl.dot with input_precision "ieee": FMA, no tensor cores) and int4 (weights dequantized in registers) get
  smaller tiles; every entry is compiled for its target by kernels/triton_aot.py and must have no spills and fit
  the target's shared memory (the sm80 table is held to 99 KB, so sm86 / sm89 parts can use it as well).

Re-tuning: benchmarks/gpu_suite.py --tune times candidate configurations on a GPU and writes a JSON table with
`write_table`; a launcher reads it when env QWEN2_MOE_HF_TRITON_CONFIGS names it (it replaces the built-in
entries it has). Recompile the report after a re-tune: `python -m qwen2_moe_hf.kernels.triton_aot --all`.
"""

import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

ENV_CONFIGS = "QWEN2_MOE_HF_TRITON_CONFIGS"
GENERATIONS = ("sm80", "sm90")
DTYPE_CLASSES = ("16bit", "fp32", "int4")
PACK = 8  # 4-bit values per int32 (block_k must be a multiple)

# What each generation's entries must fit (bytes of shared memory per block, registers per thread).
SMEM_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
SMEM_PORTABLE_SM8X = 99 * 1024  # sm86 / sm89 (and sm120): the sm80 table must fit these too
MAX_REGS = 255


@dataclass(frozen=True)
class Tile:
    """One kernel's launch: its N and K tile, warps and pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class SortedConfig:
    """The sorted (grouped-GEMM) path: one BLOCK_M (the align step pads each expert's slots to it) shared by
    GEMM1 (gate/up, silu*up) and GEMM2 (down, routing weight)."""

    block_m: int
    gemm1: Tile
    gemm2: Tile


@dataclass(frozen=True)
class DecodeConfig:
    """The decode path (a GEMV per slot, no sort): no BLOCK_M."""

    gemv1: Tile
    gemv2: Tile


@dataclass(frozen=True)
class LinearConfig:
    """One GPTQ Linear (gptq_linear_triton)."""

    block_m: int
    tile: Tile


# The combine (sum over the top-k weighted rows, one cast): memory-bound, one fixed launch shape.
COMBINE = Tile(block_n=1024, block_k=0, num_warps=4, num_stages=1)

T = Tile
# (max average slots per expert, config); the last bound is None (no limit). Slots per expert = tokens * top_k / E.
SORTED: Dict[Tuple[str, str], Tuple[Tuple[Optional[float], SortedConfig], ...]] = {
    ("sm90", "16bit"): (
        (8, SortedConfig(16, T(64, 128, 4, 4), T(128, 128, 4, 4))),
        (24, SortedConfig(32, T(64, 128, 4, 3), T(128, 128, 4, 3))),
        (96, SortedConfig(64, T(64, 64, 4, 3), T(128, 64, 4, 3))),
        (None, SortedConfig(128, T(128, 64, 8, 4), T(256, 64, 8, 4))),
    ),
    ("sm80", "16bit"): (
        (8, SortedConfig(16, T(64, 128, 4, 3), T(128, 128, 4, 3))),
        (24, SortedConfig(32, T(64, 128, 4, 3), T(128, 128, 4, 3))),
        (96, SortedConfig(64, T(128, 64, 8, 3), T(256, 64, 8, 3))),
        (None, SortedConfig(128, T(64, 64, 8, 3), T(128, 64, 8, 3))),
    ),
}
# fp32 and int4 are not yet tuned per generation: one entry serves both until a GPU run says otherwise.
SORTED.update({
    (gen, "fp32"): (
        (24, SortedConfig(16, T(32, 32, 4, 2), T(64, 32, 8, 2))),
        (None, SortedConfig(32, T(32, 32, 8, 2), T(32, 32, 8, 2))),
    ) for gen in GENERATIONS
})
SORTED.update({
    (gen, "int4"): (
        (8, SortedConfig(16, T(32, 64, 4, 3), T(64, 64, 4, 3))),
        (24, SortedConfig(32, T(32, 64, 4, 3), T(64, 64, 4, 3))),
        (None, SortedConfig(64, T(32, 64, 4, 3), T(64, 64, 8, 3))),
    ) for gen in GENERATIONS
})

DECODE: Dict[Tuple[str, str], DecodeConfig] = {
    ("sm90", "16bit"): DecodeConfig(T(16, 256, 4, 3), T(32, 128, 4, 3)),
    ("sm80", "16bit"): DecodeConfig(T(16, 256, 4, 3), T(32, 128, 4, 3)),
    ("sm90", "fp32"): DecodeConfig(T(16, 128, 4, 2), T(32, 64, 4, 2)),
    ("sm80", "fp32"): DecodeConfig(T(16, 128, 4, 2), T(32, 64, 4, 2)),
    ("sm90", "int4"): DecodeConfig(T(32, 64, 4, 2), T(32, 64, 4, 2)),
    ("sm80", "int4"): DecodeConfig(T(32, 64, 4, 2), T(32, 64, 4, 2)),
}

# gptq_linear_triton: (max rows, config), by the input's dtype class ("int4": 16-bit x; "fp32": fp32 x).
LINEAR: Dict[Tuple[str, str], Tuple[Tuple[Optional[float], LinearConfig], ...]] = {
    (gen, "int4"): (
        (16, LinearConfig(16, T(32, 128, 4, 3))),
        (64, LinearConfig(32, T(64, 64, 4, 3))),
        (None, LinearConfig(64, T(64, 64, 4, 3))),
    ) for gen in GENERATIONS
}
LINEAR.update({
    (gen, "fp32"): (
        (16, LinearConfig(16, T(32, 32, 4, 2))),
        (None, LinearConfig(32, T(32, 32, 8, 2))),
    ) for gen in GENERATIONS
})
del T


# ---------------------------------------------------------------------------------------------------------------
# Picking


def generation(capability: Optional[Tuple[int, int]]) -> str:
    """The table generation of a CUDA capability: sm90 for Hopper and the datacenter parts after it (227 KB of
    shared memory per block), sm80 for everything else (A100's table, held to the 99 KB of sm86 / sm89 / sm120).
    None (no GPU: the interpreter) reads the sm90 table."""
    if capability is None:
        return "sm90"
    major = capability[0]
    return "sm90" if major in (9, 10, 11) else "sm80"


def dtype_class(dtype_name: str, int4: bool) -> str:
    """"fp32" for fp32 activations (dense or 4-bit: the dot runs on FMA units), "int4" for 4-bit weights with 16-bit
    activations, "16bit" for dense fp16 / bf16."""
    name = str(dtype_name).replace("torch.", "")
    if name in ("float32", "fp32"):
        return "fp32"
    if name not in ("float16", "bfloat16", "fp16", "bf16"):
        raise ValueError(f"dtype {dtype_name!r}: expected float16, bfloat16 or float32")
    return "int4" if int4 else "16bit"


def slots_per_expert(tokens: int, top_k: int, num_experts: int) -> float:
    return tokens * top_k / max(num_experts, 1)


def _bucket(entries, value):
    for bound, config in entries:
        if bound is None or value <= bound:
            return config
    raise AssertionError("a table's last bound must be None")


def pick_sorted(capability: Optional[Tuple[int, int]], dtype_name: str, int4: bool, tokens: int, top_k: int,
                num_experts: int) -> SortedConfig:
    """The sorted path's configuration: a pure function of (capability, dtype, int4, tokens, top_k, experts)."""
    key = (generation(capability), dtype_class(dtype_name, int4))
    return _bucket(active_tables()["sorted"][key], slots_per_expert(tokens, top_k, num_experts))


def pick_decode(capability: Optional[Tuple[int, int]], dtype_name: str, int4: bool) -> DecodeConfig:
    return active_tables()["decode"][(generation(capability), dtype_class(dtype_name, int4))]


def pick_linear(capability: Optional[Tuple[int, int]], dtype_name: str, rows: int) -> LinearConfig:
    key = (generation(capability), dtype_class(dtype_name, True))
    return _bucket(active_tables()["linear"][key], rows)


# ---------------------------------------------------------------------------------------------------------------
# Checks, the JSON form, overrides


def check_tile(tile: Tile, *, what: str = "tile") -> None:
    """The kernels' constraints: power-of-two tiles, block_k a multiple of 8 (int4 packing), 1-8 warps (powers of
    two), 1-6 stages."""
    bn, bk = tile.block_n, tile.block_k
    if bn < 1 or bn & (bn - 1) or bk < PACK or bk % PACK or bk & (bk - 1):
        raise ValueError(f"{what}: block_n {bn} / block_k {bk}: powers of two expected, block_k a multiple of {PACK}")
    if tile.num_warps not in (1, 2, 4, 8, 16) or not 1 <= tile.num_stages <= 6:
        raise ValueError(f"{what}: num_warps {tile.num_warps} / num_stages {tile.num_stages} out of range")


def check_block_m(block_m: int, *, what: str = "") -> None:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"{what + ': ' if what else ''}block_m {block_m}, expected a power of two >= 16 (tl.dot's "
                         f"minimum)")


def _tile(v) -> Tile:
    if isinstance(v, Tile):
        return v
    if isinstance(v, Mapping):
        return Tile(int(v["block_n"]), int(v["block_k"]), int(v.get("num_warps", 4)), int(v.get("num_stages", 3)))
    return Tile(*map(int, v))


def _bound(v):
    return None if v is None else float(v)


def tables_from_json(data: Mapping) -> Dict[str, Dict]:
    """Parse (and check) the JSON form `write_table` writes: {"sorted": {"sm90/16bit": [[bound, block_m, gemm1,
    gemm2], ...]}, "decode": {"sm90/16bit": [gemv1, gemv2]}, "linear": {"sm90/int4": [[bound, block_m, tile], ...]}},
    tiles as [block_n, block_k, num_warps, num_stages] or dicts. Only the keys present are returned."""
    out: Dict[str, Dict] = {"sorted": {}, "decode": {}, "linear": {}}

    def key_of(name):
        gen, _, cls = str(name).partition("/")
        if gen not in GENERATIONS or cls not in DTYPE_CLASSES:
            raise ValueError(f"{name!r}: expected '<{'|'.join(GENERATIONS)}>/<{'|'.join(DTYPE_CLASSES)}>'")
        return gen, cls

    for name, rows in dict(data.get("sorted", {})).items():
        entries = []
        for bound, block_m, g1, g2 in rows:
            config = SortedConfig(int(block_m), _tile(g1), _tile(g2))
            check_block_m(config.block_m, what=f"sorted {name}")
            check_tile(config.gemm1, what=f"sorted {name} gemm1")
            check_tile(config.gemm2, what=f"sorted {name} gemm2")
            entries.append((_bound(bound), config))
        _check_bounds(entries, f"sorted {name}")
        out["sorted"][key_of(name)] = tuple(entries)
    for name, (g1, g2) in dict(data.get("decode", {})).items():
        config = DecodeConfig(_tile(g1), _tile(g2))
        check_tile(config.gemv1, what=f"decode {name} gemv1")
        check_tile(config.gemv2, what=f"decode {name} gemv2")
        out["decode"][key_of(name)] = config
    for name, rows in dict(data.get("linear", {})).items():
        entries = []
        for bound, block_m, tile in rows:
            config = LinearConfig(int(block_m), _tile(tile))
            check_block_m(config.block_m, what=f"linear {name}")
            check_tile(config.tile, what=f"linear {name}")
            entries.append((_bound(bound), config))
        _check_bounds(entries, f"linear {name}")
        out["linear"][key_of(name)] = tuple(entries)
    return out


def _check_bounds(entries, what):
    if not entries or entries[-1][0] is not None:
        raise ValueError(f"{what}: the last entry's bound must be null (no limit)")
    bounds = [b for b, _ in entries[:-1]]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        raise ValueError(f"{what}: bounds must increase, got {bounds}")


def tables_to_json(tables: Mapping[str, Mapping]) -> Dict:
    def t(tile):
        return [tile.block_n, tile.block_k, tile.num_warps, tile.num_stages]

    return {
        "sorted": {f"{g}/{c}": [[b, cfg.block_m, t(cfg.gemm1), t(cfg.gemm2)] for b, cfg in entries]
                   for (g, c), entries in sorted(tables["sorted"].items())},
        "decode": {f"{g}/{c}": [t(cfg.gemv1), t(cfg.gemv2)] for (g, c), cfg in sorted(tables["decode"].items())},
        "linear": {f"{g}/{c}": [[b, cfg.block_m, t(cfg.tile)] for b, cfg in entries]
                   for (g, c), entries in sorted(tables["linear"].items())},
    }


def builtin_tables() -> Dict[str, Dict]:
    return {"sorted": dict(SORTED), "decode": dict(DECODE), "linear": dict(LINEAR)}


_BUILTIN = builtin_tables()


@functools.lru_cache(maxsize=8)
def _with_overrides(path: str, stamp: Tuple[int, int]) -> Dict[str, Dict]:  # stamp: (mtime_ns, size)
    with open(path) as f:
        overrides = tables_from_json(json.load(f))
    tables = builtin_tables()
    for part in tables:
        tables[part].update(overrides[part])
    return tables


def active_tables() -> Dict[str, Dict]:
    """The built-in tables, with the entries of the JSON file named by env QWEN2_MOE_HF_TRITON_CONFIGS (if set)
    in place of theirs. A file that cannot be read or parsed raises (naming the variable): a tuned table that
    silently does not apply would be worse. Cached (per file version): called on every launch. Do not modify the
    result."""
    path = os.environ.get(ENV_CONFIGS)
    if not path:
        return _BUILTIN
    try:
        st = os.stat(path)
        return _with_overrides(path, (st.st_mtime_ns, st.st_size))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{ENV_CONFIGS}={path!r}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# Enumeration (for the AOT report) and re-tuning (for gpu_suite.py --tune)


def launchable(tables: Optional[Mapping[str, Mapping]] = None) -> List[Tuple[str, str, str, int, Tile]]:
    """Every (kernel, generation, dtype class, block_m, tile) the launchers can pick from `tables` (default: the
    active tables), deduplicated. Kernels: gemm1, gemm2 (sorted), gemv1, gemv2 (decode), int4_linear, combine."""
    tables = active_tables() if tables is None else tables
    seen, out = set(), []

    def add(*row):
        if row not in seen:
            seen.add(row)
            out.append(row)

    for (gen, cls), entries in tables["sorted"].items():
        for _, cfg in entries:
            add("gemm1", gen, cls, cfg.block_m, cfg.gemm1)
            add("gemm2", gen, cls, cfg.block_m, cfg.gemm2)
    for (gen, cls), cfg in tables["decode"].items():
        add("gemv1", gen, cls, 0, cfg.gemv1)
        add("gemv2", gen, cls, 0, cfg.gemv2)
    for (gen, cls), entries in tables["linear"].items():
        for _, cfg in entries:
            add("int4_linear", gen, cls, cfg.block_m, cfg.tile)
    for gen in GENERATIONS:
        add("combine", gen, "any", 0, COMBINE)
    return out


def candidates(kernel: str, dtype_cls: str) -> List[Tuple[int, Tile]]:
    """The space gpu_suite.py --tune searches for one kernel: (block_m, tile) pairs, block_m 0 for the GEMVs. It
    holds every built-in entry of the 16-bit and int4 tables (a test checks) and stays near 260 compiles in all, so
    that a re-tune fits one run: 4 warps below 64 rows, 4 or 8 at 64, 8 at 128; BLOCK_K 64 for the large tiles."""
    out = []
    if kernel in ("gemv1", "gemv2"):
        if dtype_cls == "16bit":
            return [(0, Tile(n, k, w, s)) for n in (16, 32, 64) for k in (128, 256) for w in (4, 8) for s in (2, 3)]
        return [(0, Tile(n, k, 4, s)) for n in (16, 32, 64) for k in (32, 64, 128) for s in (2, 3)]
    if kernel == "int4_linear":
        return [(m, Tile(n, k, 4, s)) for m in (16, 32, 64) for n in (32, 64, 128) for k in (32, 64, 128)
                for s in (2, 3)]
    if kernel not in ("gemm1", "gemm2"):
        raise ValueError(f"no tuning candidates for kernel {kernel!r}")
    if dtype_cls == "16bit":
        for m in (16, 32, 64, 128):
            if m <= 32:
                ns = (64, 128) if kernel == "gemm1" else (64, 128, 256)
                ks, warps = (64, 128), (4,)
            else:
                ns = (64, 128) if kernel == "gemm1" else (128, 256)
                ks, warps = (64,), (4, 8) if m == 64 else (8,)
            out += [(m, Tile(n, k, w, s)) for n in ns for k in ks for w in warps for s in (3, 4)]
        return out
    ns = (32, 64) if kernel == "gemm1" else (32, 64, 128)
    for m in ((16, 32) if dtype_cls == "fp32" else (16, 32, 64)):
        out += [(m, Tile(n, k, w, s)) for n in ns for k in (32, 64) for w in ((4, 8) if m == 64 or dtype_cls == "fp32"
                                                                                else (4,)) for s in (2, 3)]
    return out


@dataclass(frozen=True)
class Timing:
    """One measurement for the tuner: `kernel` ran `tile` with `block_m` at `slots` average slots per expert (the
    sorted path; rows for int4_linear; ignored for the GEMVs) on `gen` / `dtype_cls` in `ms` milliseconds."""

    kernel: str
    gen: str
    dtype_cls: str
    slots: float
    block_m: int
    tile: Tile
    ms: float


def choose_tables(timings: Iterable[Timing], base: Optional[Mapping[str, Mapping]] = None) -> Dict[str, Dict]:
    """The table the timings pick, on top of `base` (default: the built-in tables).

    Sorted path: for each (gen, class) and each measured slots-per-expert value, the block_m whose best GEMM1 plus
    best GEMM2 is fastest (they share it), with those two tiles; consecutive values become buckets bounded half way
    (geometrically) between them. Decode: for each GEMV the tile with the least total time over the token counts
    measured. int4_linear: the fastest (block_m, tile) per measured row count, bucketed the same way."""
    tables = {part: dict(v) for part, v in (base or builtin_tables()).items()}
    timings = list(timings)
    groups: Dict[Tuple, Dict] = {}
    for t in timings:
        groups.setdefault((t.gen, t.dtype_cls), []).append(t)
    for key, rows in groups.items():
        sorted_rows = [r for r in rows if r.kernel in ("gemm1", "gemm2")]
        if sorted_rows:
            picks = []
            for slots in sorted({r.slots for r in sorted_rows}):
                best = {}
                for r in sorted_rows:
                    if r.slots == slots:
                        k = (r.block_m, r.kernel)
                        if k not in best or r.ms < best[k].ms:
                            best[k] = r
                options = [(best[(m, "gemm1")].ms + best[(m, "gemm2")].ms, m)
                           for m in {m for m, _ in best} if (m, "gemm1") in best and (m, "gemm2") in best]
                if options:
                    _, m = min(options)
                    picks.append((slots, SortedConfig(m, best[(m, "gemm1")].tile, best[(m, "gemm2")].tile)))
            if picks:
                tables["sorted"][key] = _buckets(picks)
        for name in ("gemv1", "gemv2"):
            rows_k = [r for r in rows if r.kernel == name]
            if rows_k:
                # the tile with the least total time over the token counts measured (only tiles measured at all)
                counts = {r.slots for r in rows_k}
                totals: Dict[Tile, List[float]] = {}
                for r in rows_k:
                    totals.setdefault(r.tile, []).append(r.ms)
                best = min((t for t, v in totals.items() if len(v) == len(counts)), key=lambda t: sum(totals[t]),
                           default=None) or min(rows_k, key=lambda r: r.ms).tile
                old = tables["decode"].get(key) or DecodeConfig(best, best)
                tables["decode"][key] = (DecodeConfig(best, old.gemv2) if name == "gemv1"
                                         else DecodeConfig(old.gemv1, best))
        lin = [r for r in rows if r.kernel == "int4_linear"]
        if lin:
            picks = []
            for rows_n in sorted({r.slots for r in lin}):
                best = min((r for r in lin if r.slots == rows_n), key=lambda r: r.ms)
                picks.append((rows_n, LinearConfig(best.block_m, best.tile)))
            tables["linear"][key] = _buckets(picks)
    return tables


def _buckets(picks: Sequence[Tuple[float, object]]):
    """[(measured value, config)] ascending -> ((bound, config), ..., (None, config)), equal neighbours merged."""
    entries = []
    for i, (value, config) in enumerate(picks):
        bound = None if i == len(picks) - 1 else (value * picks[i + 1][0]) ** 0.5 if value > 0 else picks[i + 1][0] / 2
        if entries and entries[-1][1] == config:
            entries[-1] = (bound, config)
        else:
            entries.append((bound, config))
    return tuple(entries)


def write_table(timings: Iterable[Timing], path: str, *, meta: Optional[Mapping] = None) -> Dict:
    """Choose the table from `timings` (choose_tables) and write it as JSON to `path`, the file env
    QWEN2_MOE_HF_TRITON_CONFIGS can name. Returns the JSON object."""
    data = tables_to_json(choose_tables(timings))
    if meta:
        data["meta"] = dict(meta)
    tables_from_json(data)  # what we write must read back
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def describe(tile: Tile, block_m: int = 0) -> str:
    head = f"{block_m}x" if block_m else ""
    return f"{head}{tile.block_n}x{tile.block_k} w{tile.num_warps} s{tile.num_stages}"

