"""Triton kernels (GPU; tested on CPU under TRITON_INTERPRET=1 in fp16 / fp32, whose interpreter reads bf16 wrongly).

One family for the routed experts, in vLLM's fused-MoE shape, where dense and GPTQ 4-bit weights differ only in how
a weight tile is loaded (`_weight_tile`, a `tl.constexpr` INT4 choice):
  align (csrc moe_align: slots sorted by expert, padded to BLOCK_M) ->
  GEMM1: act[slot] = silu(x[token] @ W_gate[e]^T) * (x[token] @ W_up[e]^T)      (SiLU*up fused, one kernel)
  GEMM2: y[slot]   = weight[slot] * (act[slot] @ W_down[e]^T)                   (routing weight fused, fp32)
  combine: out[t] = sum_j y[t*k + j]                                             (one kernel: fp32 sum, one cast)
and a decode path for a few tokens that skips the sort: one program per (slot, output tile), the same combine.

Tiles, warps and stages come from kernels/triton_configs.py (our table, by GPU generation, dtype class and slots
per expert); kernels/triton_aot.py compiles every configuration the launchers can pick to cubin for sm_80 and
sm_90 and reports registers, spills and shared memory (docs/dispatch.md).

Expert weights stay where the model keeps them (the hub's layout, one tensor per expert and projection): the
kernels read them through a table of base addresses, int64 [3 projections (gate, up, down), 4 parts, E experts],
built once per layer (`expert_tables`) and kept by the layer's prepared weights. Dense weights use part 0 (the
[out, in] weight); GPTQ uses qweight, qzeros, scales, g_idx, read as (gptq/format.py)
  W[n, k] = scales[g, n] * (q[k, n] - (zero[g, n] + zero_offset)),  g = g_idx[k]
dequantized per tile in registers (fp32), never in memory. Also here: one GPTQ Linear (`gptq_linear_triton`).

The weighted top-k sum: GEMM2 multiplies each row by its routing weight in fp32 in its epilogue (vLLM's
MUL_ROUTED_WEIGHT) and writes the weighted rows [T*k, H]; `_combine` adds each token's k rows in slot order in fp32
and rounds once. Not atomics into an fp32 [T, H] output: those need a zeroing pass before and a cast after (three
launches against two here), and their order of additions, hence the last bit of every output, would change from
run to run; this project's combines are deterministic (the CPU op's and the CUDA moe_combine's too).
"""

import time as _time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import triton_configs as configs

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PACK = 8  # 4-bit values per int32
ALIGN = 16  # bytes: every expert tensor's address (the kernels tell Triton so)
Int4Linear = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # qweight, qzeros, scales, g_idx


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
#
# Shared conventions: the weight pointers of an expert are read once, before the K loop (so Triton's pipeliner sees
# loop-invariant bases and can stage the weight tiles in shared memory); weight columns past N are clamped
# (`cols % N`: real memory, results masked at the store) so weight loads need no N mask; K masks only exist when K
# is not a multiple of BLOCK_K (a constexpr test: H and I are constexpr); rows of padding slots read slot 0's
# (token 0's) data and are masked at the store.


@triton.jit
def block_slots(sorted_slots, block_experts, num_slots, BLOCK_M: tl.constexpr):
    """The expert of this program's row block (-1: a padding block past the used length), its slots, which of
    them are real, and the slots made safe to index with (0 where not real)."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts + pid_m)
    slots = tl.load(sorted_slots + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    return expert, slots, valid, tl.where(valid, slots, 0)


@triton.jit
def _safe_expert(expert, num_experts):
    """An expert id fit to index the address table: out-of-range ids read expert 0's weights, never memory past the
    table, and `_combine` leaves their rows out (routed_experts raises on them first unless told not to check)."""
    return tl.where((expert >= 0) & (expert < num_experts), expert, 0)


@triton.jit
def _linear_ptrs(table, linear: tl.constexpr, expert, num_experts, INT4: tl.constexpr, W_DTYPE: tl.constexpr):
    """Base pointers of projection `linear` (0 gate, 1 up, 2 down) of `expert`: (qweight, qzeros, scales, g_idx)
    for int4, the [N, K] weight four times for dense."""
    # Every address is 16-byte aligned (expert_tables checks it). Saying so lets Triton vectorize the weight loads
    # and pipeline them through shared memory (num_stages): a pointer made from an integer carries no alignment, and
    # without this the weight tiles were loaded element by element into registers (and spilled; docs/dispatch.md).
    row = table + linear * 4 * num_experts + expert
    if INT4:
        qw = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.int32)), 16)
        qz = tl.multiple_of(tl.load(row + num_experts).to(tl.pointer_type(tl.int32)), 16)
        sc = tl.multiple_of(tl.load(row + 2 * num_experts).to(tl.pointer_type(W_DTYPE)), 16)
        gi = tl.multiple_of(tl.load(row + 3 * num_experts).to(tl.pointer_type(tl.int32)), 16)
        return qw, qz, sc, gi
    else:
        w = tl.multiple_of(tl.load(row).to(tl.pointer_type(W_DTYPE)), 16)
        return w, w, w, w


@triton.jit
def _dequant_tile(qw, qz, sc, gi, ks, cols, k_ok, N, ZERO_OFFSET: tl.constexpr, MASK_K: tl.constexpr):
    """W^T[ks, cols] as fp32 [BLOCK_K, BLOCK_N] from one Linear's GPTQ tensors (N: its out_features; cols < N)."""
    if MASK_K:
        g = tl.load(gi + ks, mask=k_ok, other=0)
        # Each int32 is loaded once per row it holds (8 times): the repeats hit cache, and the tile stays 2-D.
        packed = tl.load(qw + (ks // 8)[:, None] * N + cols[None, :], mask=k_ok[:, None], other=0)
    else:
        g = tl.load(gi + ks)
        packed = tl.load(qw + (ks // 8)[:, None] * N + cols[None, :])
    q = (packed >> ((ks % 8) * 4)[:, None]) & 0xF
    zp = tl.load(qz + g[:, None] * (N // 8) + (cols // 8)[None, :])  # g is a real group (0 where masked)
    zero = ((zp >> ((cols % 8) * 4)[None, :]) & 0xF) + ZERO_OFFSET  # nibble masked before the offset, as format.py
    if MASK_K:
        scale = tl.load(sc + g[:, None] * N + cols[None, :], mask=k_ok[:, None], other=0.0).to(tl.float32)
    else:
        scale = tl.load(sc + g[:, None] * N + cols[None, :]).to(tl.float32)
    return (q - zero).to(tl.float32) * scale  # rows past K: scale 0 -> weight 0


@triton.jit
def _weight_tile(w, qz, sc, gi, ks, cols, k_ok, N, K, INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                 MASK_K: tl.constexpr):
    """W^T[ks, cols] ([BLOCK_K, BLOCK_N]) of a Linear(K -> N) from `_linear_ptrs`: the only place where dense and
    4-bit weights differ. Dense: the [N, K] weight's own dtype; int4: dequantized to fp32. cols < N."""
    if INT4:
        return _dequant_tile(w, qz, sc, gi, ks, cols, k_ok, N, ZERO_OFFSET, MASK_K)
    else:
        if MASK_K:
            return tl.load(w + cols[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.0)
        else:
            return tl.load(w + cols[None, :] * K + ks[:, None])


@triton.jit
def _rows_tile(ptr, rows, ks, k_ok, K: tl.constexpr, MASK_K: tl.constexpr):
    """ptr[rows, ks] ([BLOCK_M, BLOCK_K]) of a row-major [*, K] tensor; rows are all real (safe) indices."""
    if MASK_K:
        return tl.load(ptr + rows[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)
    else:
        return tl.load(ptr + rows[:, None] * K + ks[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Routed experts: sorted path (many tokens)


@triton.jit
def _gemm1(
    x_ptr, table, act_ptr, sorted_slots, block_experts, num_slots, num_experts,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    W_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:  # a padding block past the used length
        return
    tokens = safe // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    wcols = cols % I
    gq, gz, gs, gg = _linear_ptrs(table, 0, expert, num_experts, INT4, W_DTYPE)
    uq, uz, us, ug = _linear_ptrs(table, 1, expert, num_experts, INT4, W_DTYPE)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = _rows_tile(x_ptr, tokens, ks, k_ok, H, H % BLOCK_K != 0)
        wg = _weight_tile(gq, gz, gs, gg, ks, wcols, k_ok, I, H, INT4, ZERO_OFFSET, H % BLOCK_K != 0)
        wu = _weight_tile(uq, uz, us, ug, ks, wcols, k_ok, I, H, INT4, ZERO_OFFSET, H % BLOCK_K != 0)
        acc_g = tl.dot(a, wg.to(x_ptr.dtype.element_ty), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, wu.to(x_ptr.dtype.element_ty), acc_u, input_precision=DOT_PRECISION)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slots[:, None] * I + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _gemm2(
    act_ptr, table, weights_ptr, y_ptr, sorted_slots, block_experts, num_slots, num_experts,
    H: tl.constexpr, I: tl.constexpr, INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    W_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < H
    wcols = cols % H
    dq, dz, ds, dg = _linear_ptrs(table, 2, expert, num_experts, INT4, W_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = _rows_tile(act_ptr, safe, ks, k_ok, I, I % BLOCK_K != 0)
        w = _weight_tile(dq, dz, ds, dg, ks, wcols, k_ok, H, I, INT4, ZERO_OFFSET, I % BLOCK_K != 0)
        acc = tl.dot(a, w.to(act_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    # The routing weight, in fp32 on the fp32 accumulator (MUL_ROUTED_WEIGHT); `_combine` sums the k rows.
    acc = acc * tl.load(weights_ptr + safe).to(tl.float32)[:, None]
    tl.store(y_ptr + slots[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Routed experts: decode path (a few tokens, no sort)


@triton.jit
def _decode_gemm1(
    x_ptr, table, ids_ptr, act_ptr, num_experts,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (slot, tile of I): a vector-matrix product, so no tl.dot padding to 16 rows.
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = _safe_expert(tl.load(ids_ptr + slot), num_experts)
    token = slot // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    wcols = cols % I
    gq, gz, gs, gg = _linear_ptrs(table, 0, expert, num_experts, INT4, W_DTYPE)
    uq, uz, us, ug = _linear_ptrs(table, 1, expert, num_experts, INT4, W_DTYPE)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        if H % BLOCK_K != 0:
            a = tl.load(x_ptr + token * H + ks, mask=k_ok, other=0.0).to(tl.float32)
        else:
            a = tl.load(x_ptr + token * H + ks).to(tl.float32)
        wg = _weight_tile(gq, gz, gs, gg, ks, wcols, k_ok, I, H, INT4, ZERO_OFFSET, H % BLOCK_K != 0)
        wu = _weight_tile(uq, uz, us, ug, ks, wcols, k_ok, I, H, INT4, ZERO_OFFSET, H % BLOCK_K != 0)
        acc_g += tl.sum(wg.to(tl.float32) * a[:, None], axis=0)
        acc_u += tl.sum(wu.to(tl.float32) * a[:, None], axis=0)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slot * I + cols, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _decode_gemm2(
    act_ptr, table, ids_ptr, weights_ptr, y_ptr, num_experts,
    H: tl.constexpr, I: tl.constexpr, INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = _safe_expert(tl.load(ids_ptr + slot), num_experts)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < H
    wcols = cols % H
    dq, dz, ds, dg = _linear_ptrs(table, 2, expert, num_experts, INT4, W_DTYPE)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        if I % BLOCK_K != 0:
            a = tl.load(act_ptr + slot * I + ks, mask=k_ok, other=0.0).to(tl.float32)
        else:
            a = tl.load(act_ptr + slot * I + ks).to(tl.float32)
        w = _weight_tile(dq, dz, ds, dg, ks, wcols, k_ok, H, I, INT4, ZERO_OFFSET, I % BLOCK_K != 0)
        acc += tl.sum(w.to(tl.float32) * a[:, None], axis=0)
    acc = acc * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * H + cols, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------------
# The weighted sum over the top-k slots


@triton.jit
def _combine(y_ptr, ids_ptr, out_ptr, num_experts, H: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t, cols] = sum_j y[t * TOP_K + j, cols] (rows already weighted), in fp32 in slot order, rounded once.
    Slots whose expert id is out of range add nothing: the sorted path never wrote their rows (moe_align leaves
    such ids out), the decode path wrote expert 0's."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    base = y_ptr + token.to(tl.int64) * (TOP_K * H)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * TOP_K + j)
        real = (expert >= 0) & (expert < num_experts)
        row = tl.load(base + j * H + cols, mask=ok, other=0.0).to(tl.float32)  # in y either way (unwritten rows)
        acc += tl.where(real, row, 0.0)  # a select: whatever an unwritten row holds (NaN too) cannot reach acc
    tl.store(out_ptr + token.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# One GPTQ Linear


@triton.jit
def _int4_linear(
    x_ptr, qw, qz, sc, gi, bias_ptr, y_ptr, M, N, K,
    ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    safe_rows = tl.where(row_ok, rows, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    wcols = cols % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is not a constexpr here (one compile for every layer): K always masked
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + safe_rows[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)
        w = _dequant_tile(qw, qz, sc, gi, ks, wcols, k_ok, N, ZERO_OFFSET, True)
        acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + wcols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Host side


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 on tensor cores ("ieee"; the default would round operands to tf32); fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_zero_offset(zero_offset: int) -> None:
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset: expected 1 (gptq / v1) or 0 (gptq_v2), got {zero_offset!r}")


def check_int4_linear(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, device: torch.device) -> Tuple[int, int]:
    """Check one Linear's GPTQ tensors against each other; returns (in_features K, out_features N). Errors name
    `name.tensor` (name "" for gptq_linear_triton's own arguments)."""
    p = f"{name}." if name else ""
    for field, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{p}{field}: expected a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{p}{field}: on {t.device}, expected {device} (the input's device)")
        if not t.is_contiguous():
            raise ValueError(f"{p}{field}: must be contiguous (the kernels read it row-major)")
    for field, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"{p}{field}: dtype {t.dtype}, expected torch.int32")
    if scales.dtype not in TL_DTYPES:
        raise ValueError(f"{p}scales: dtype {scales.dtype}, expected float16, bfloat16 or float32")
    if qweight.dim() != 2:
        raise ValueError(f"{p}qweight: expected 2-D [in_features/8, out_features], got shape {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    if n % PACK:
        raise ValueError(f"{p}qweight: out_features {n} must be a multiple of {PACK} (qzeros packs 8 per int32)")
    if scales.dim() != 2 or scales.shape[1] != n or scales.shape[0] < 1:
        raise ValueError(f"{p}scales: shape {tuple(scales.shape)}, expected [groups, {n}]")
    groups = scales.shape[0]
    if tuple(qzeros.shape) != (groups, n // PACK):
        raise ValueError(f"{p}qzeros: shape {tuple(qzeros.shape)}, expected {(groups, n // PACK)}")
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"{p}g_idx: shape {tuple(g_idx.shape)}, expected ({k},)")
    return k, n


def _check_blocks(block_n: int, block_k: int) -> None:
    if block_k % PACK or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_k {block_k} / block_n {block_n}: powers of two expected, block_k a multiple of 8")


def device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The CUDA capability the launchers pick tiles for; None off CUDA (the interpreter: triton_configs reads the
    sm90 table then)."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _override(tile: configs.Tile, block_n: Optional[int], block_k: Optional[int]) -> configs.Tile:
    tile = configs.Tile(block_n or tile.block_n, block_k or tile.block_k, tile.num_warps, tile.num_stages)
    _check_blocks(tile.block_n, tile.block_k)
    return tile


def _launch_opts(tile: configs.Tile) -> dict:
    return dict(num_warps=tile.num_warps, num_stages=tile.num_stages)


def gptq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       g_idx: torch.Tensor, bits: int = 4, zero_offset: int = 1, bias: Optional[torch.Tensor] = None,
                       *, block_n: Optional[int] = None, block_k: Optional[int] = None,
                       config: Optional[configs.LinearConfig] = None,
                       capability: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W the dequantized 4-bit GPTQ weight, dequantized tile by tile inside the kernel.

    x [..., K] fp16 / bf16 / fp32 on the tensors' device -> y [..., N] in x's dtype (fp32 accumulation). g_idx may
    be in any order (act-order); its values are trusted to lie in [0, groups) (not checked: that would sync).
    Tiles: triton_configs.pick_linear by the device's capability (or `capability`), x's dtype and the rows;
    `config` forces one, block_n / block_k override its tile.
    """
    if bits != 4:
        raise ValueError(f"bits: the Triton GPTQ kernels read 4-bit weights only, got bits={bits!r}")
    check_zero_offset(zero_offset)
    if not isinstance(x, torch.Tensor) or x.dtype not in TL_DTYPES:
        raise ValueError(f"x: expected a float16, bfloat16 or float32 tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    k, n = check_int4_linear("", qweight, qzeros, scales, g_idx, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x: last dimension {x.shape[-1]}, expected in_features {k} (qweight has {k // PACK} rows)")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != x.device):
        raise ValueError(f"bias: shape {tuple(bias.shape)} on {bias.device}, expected ({n},) on {x.device}")
    if block_n is not None or block_k is not None:
        _check_blocks(block_n or 64, block_k or 64)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cap = capability if capability is not None else device_capability(x.device)
        cfg = config or configs.pick_linear(cap, str(x.dtype), m)
        tile = _override(cfg.tile, block_n, block_k)
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, tile.block_n))
        _int4_linear[grid](
            x2, qweight, qzeros, scales, g_idx, bias.contiguous() if bias is not None else y, y, m, n, k,
            ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, **_launch_opts(tile))
    return y.reshape(*x.shape[:-1], n)


@dataclass(frozen=True)
class ExpertTables:
    """A layer's expert weights as the kernels read them: the address table and what they need to know of it. Holds
    the tensors, so the addresses stay valid while it lives."""

    table: torch.Tensor  # int64 [3, 4, E]
    num_experts: int
    hidden: int
    inter: int
    int4: bool
    zero_offset: int
    w_dtype: torch.dtype  # dense: the weights' dtype; int4: the scales'
    tensors: Tuple[torch.Tensor, ...]


def expert_tables(gate: Sequence[Union[torch.Tensor, Int4Linear]], up: Sequence[Union[torch.Tensor, Int4Linear]],
                  down: Sequence[Union[torch.Tensor, Int4Linear]], *, int4: bool, zero_offset: int = 1,
                  device: Optional[torch.device] = None) -> ExpertTables:
    """Check every expert's weights (one [out, in] tensor each, or one (qweight, qzeros, scales, g_idx) each when
    `int4`) and gather their addresses. All experts of a projection have one shape; gate and up are Linear(H -> I),
    down Linear(I -> H)."""
    names = ("gate", "up", "down")
    lists = (gate, up, down)
    num_experts = len(gate)
    if not num_experts:
        raise ValueError("gate: no experts")
    if int4:
        check_zero_offset(zero_offset)
    device = torch.device(device) if device is not None else (gate[0][0] if int4 else gate[0]).device
    shapes, w_dtype = {}, None
    for name, entries in zip(names, lists):
        if len(entries) != num_experts:
            raise ValueError(f"{name}: {len(entries)} experts, but gate has {num_experts}")
        for e, entry in enumerate(entries):
            if int4:
                if not isinstance(entry, (tuple, list)) or len(entry) != 4:
                    raise ValueError(f"{name}[{e}]: expected a tuple (qweight, qzeros, scales, g_idx)")
                check_int4_linear(f"{name}[{e}]", *entry, device)
                shape, dtype = tuple(tuple(t.shape) for t in entry), entry[2].dtype
            else:
                if not isinstance(entry, torch.Tensor) or entry.dim() != 2:
                    raise ValueError(f"{name}[{e}]: expected a 2-D [out, in] weight tensor")
                if entry.device != device or not entry.is_contiguous() or entry.dtype not in TL_DTYPES:
                    raise ValueError(f"{name}[{e}]: expected a contiguous float tensor on {device}, got {entry.dtype} "
                                     f"on {entry.device}")
                shape, dtype = tuple(entry.shape), entry.dtype
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}[{e}]: shapes {shape} differ from {name}[0]'s {shapes[name]}")
            w_dtype = w_dtype or dtype
            if dtype != w_dtype:
                raise ValueError(f"{name}[{e}]: dtype {dtype}, but gate[0]'s is {w_dtype}")
    if shapes["gate"] != shapes["up"]:
        raise ValueError(f"up: shapes {shapes['up']} differ from gate's {shapes['gate']}")
    if int4:
        hidden, inter = shapes["gate"][3][0], shapes["gate"][0][1]
        expected_down = ((inter // PACK, hidden), (inter,))
        down_shape = (shapes["down"][0], shapes["down"][3])
    else:
        inter, hidden = shapes["gate"]
        expected_down, down_shape = (hidden, inter), shapes["down"]
    if down_shape != expected_down:
        raise ValueError(f"down: shapes {down_shape}, expected {expected_down} for Linear({inter} -> {hidden})")
    parts = [[list(entry) if int4 else [entry] for entry in entries] for entries in lists]
    for name, entries in zip(names, parts):
        for e, p in enumerate(entries):
            for t in p:
                if t.data_ptr() % ALIGN:
                    raise ValueError(f"{name}[{e}]: data not {ALIGN}-byte aligned (a view at an odd offset?); the "
                                     f"kernels assume aligned weights: pass a .clone()")
    addresses = [[[(p[j].data_ptr() if j < len(p) else 0) for p in entries] for j in range(4)] for entries in parts]
    tensors = tuple(t for entries in parts for p in entries for t in p)
    return ExpertTables(torch.tensor(addresses, dtype=torch.int64, device=device), num_experts, hidden, inter, int4,
                        zero_offset if int4 else 0, w_dtype, tensors)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """csrc moe_align's contract (fixed upper-bound sizes, unused blocks have expert -1): the compiled op when it is
    built for this device, else the same in torch."""
    key = "CUDA" if topk_ids.is_cuda else "CPU"
    if torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::moe_align", key):
        sorted_slots, block_experts, _ = torch.ops.qwen2_moe_hf.moe_align(topk_ids, num_experts, block_m)
        return sorted_slots, block_experts
    return align_torch(topk_ids, num_experts, block_m)


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """moe_align in plain torch ops (any device, no host sync). Like the CUDA op, it leaves ids outside
    [0, num_experts) out (they go to an extra bucket past the last expert, whose slots are written nowhere)."""
    slots = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    device = flat.device
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts + 1)[: num_experts + 1]
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    offsets = torch.zeros(num_experts + 2, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    starts = torch.zeros(num_experts + 2, dtype=torch.long, device=device)
    starts[1:] = torch.cumsum(counts, 0)
    max_blocks = -(-(slots + num_experts * (block_m - 1)) // block_m)
    # One spare element at the end takes the writes of left-out slots, then is cut off.
    sorted_slots = torch.full((max_blocks * block_m + 1,), slots, dtype=torch.int32, device=device)
    expert_of = flat[order]
    dest = offsets[expert_of] + torch.arange(slots, device=device) - starts[expert_of]
    dest = torch.where(expert_of < num_experts, dest, max_blocks * block_m)
    sorted_slots[dest] = order.to(torch.int32)
    sorted_slots = sorted_slots[: max_blocks * block_m]
    offsets = offsets[: num_experts + 1]
    block_of = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(offsets[1:], block_of, right=True).to(torch.int32)
    block_experts[block_of >= offsets[-1]] = -1
    return sorted_slots, block_experts


def routed_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tables: ExpertTables, *,
                   decode_max_tokens: int = 4, block_m: Optional[int] = None, block_n: Optional[int] = None,
                   block_k: Optional[int] = None,
                   config: Optional[Union[configs.SortedConfig, configs.DecodeConfig]] = None,
                   capability: Optional[Tuple[int, int]] = None, check_ids: bool = True) -> torch.Tensor:
    """The weighted sum over each token's top-k routed experts (no shared expert): x [T, H] -> [T, H] in x's dtype.

    Up to `decode_max_tokens` tokens take the decode path (a GEMV per slot, no sort), more the sorted path (align,
    grouped GEMM1, GEMM2); both end in `_combine`. Tiles, warps and stages: triton_configs.pick_decode /
    pick_sorted by the device's capability (or `capability`), the dtype class and the slots per expert. `config`
    (a SortedConfig or DecodeConfig, for the path it names) forces one; block_m / block_n / block_k override its
    fields (for both GEMMs).

    Every argument is checked before any launch (types, shapes, devices, dtypes). Expert ids outside [0, E): with
    `check_ids` (the default) a ValueError, at the cost of one host sync, skipped under torch.compile and CUDA-graph
    capture; either way the kernels never index past the address table with them, and their slots add nothing."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in TL_DTYPES:
        raise ValueError("x: expected a 2-D [tokens, hidden] float16, bfloat16 or float32 tensor")
    T, H = x.shape
    if H != tables.hidden:
        raise ValueError(f"x: hidden size {H}, but the experts take {tables.hidden} inputs")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("topk_ids: expected an int64 or int32 tensor of expert ids, got "
                         f"{topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: shape {tuple(topk_ids.shape)}, expected [{T}, top_k] (one row per row of x)")
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.dtype.is_floating_point:
        raise ValueError("topk_weights: expected a floating-point tensor")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: shape {tuple(topk_weights.shape)}, expected {tuple(topk_ids.shape)}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    if not tables.int4 and tables.w_dtype != x.dtype:
        raise ValueError(f"x: dtype {x.dtype}, but the expert weights are {tables.w_dtype}")
    if tables.table.device != x.device:
        raise ValueError(f"x: on {x.device}, but the expert weights are on {tables.table.device}")
    if block_n is not None or block_k is not None:
        _check_blocks(block_n or 64, block_k or 64)
    if block_m is not None:
        configs.check_block_m(block_m)
    k, I, E = topk_ids.shape[1], tables.inter, tables.num_experts
    if T == 0:
        return torch.zeros_like(x)
    if check_ids and not _capturing(x.device):
        check_expert_ids(topk_ids, E)
    topk_ids = topk_ids.long()
    cap = capability if capability is not None else device_capability(x.device)
    x = x.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * k, H, dtype=x.dtype, device=x.device)  # weighted rows, summed by _combine
    consts = dict(H=H, I=I, INT4=tables.int4, ZERO_OFFSET=tables.zero_offset, W_DTYPE=TL_DTYPES[tables.w_dtype])
    ids = topk_ids.reshape(-1).contiguous()
    if T <= decode_max_tokens:
        cfg = config if isinstance(config, configs.DecodeConfig) else configs.pick_decode(cap, str(x.dtype),
                                                                                          tables.int4)
        t1, t2 = _override(cfg.gemv1, block_n, block_k), _override(cfg.gemv2, block_n, block_k)
        _decode_gemm1[(T * k, triton.cdiv(I, t1.block_n))](
            x, tables.table, ids, act, E, TOP_K=k, BLOCK_N=t1.block_n, BLOCK_K=t1.block_k, **consts,
            **_launch_opts(t1))
        _decode_gemm2[(T * k, triton.cdiv(H, t2.block_n))](
            act, tables.table, ids, weights, y, E, BLOCK_N=t2.block_n, BLOCK_K=t2.block_k, **consts,
            **_launch_opts(t2))
    else:
        cfg = config if isinstance(config, configs.SortedConfig) else configs.pick_sorted(
            cap, str(x.dtype), tables.int4, T, k, E)
        bm = block_m or cfg.block_m
        t1, t2 = _override(cfg.gemm1, block_n, block_k), _override(cfg.gemm2, block_n, block_k)
        sorted_slots, block_experts = align(topk_ids, E, bm)
        grid_m = block_experts.numel()
        precision = dot_precision(x.dtype)
        _gemm1[(grid_m, triton.cdiv(I, t1.block_n))](
            x, tables.table, act, sorted_slots, block_experts, T * k, E, TOP_K=k, DOT_PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=t1.block_n, BLOCK_K=t1.block_k, **consts, **_launch_opts(t1))
        _gemm2[(grid_m, triton.cdiv(H, t2.block_n))](
            act, tables.table, weights, y, sorted_slots, block_experts, T * k, E, DOT_PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=t2.block_n, BLOCK_K=t2.block_k, **consts, **_launch_opts(t2))
    return combine(y, topk_ids, E)


def _capturing(device: torch.device) -> bool:
    """Whether a host sync is impossible here: tracing by torch.compile or capture of a CUDA graph."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_expert_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """ValueError naming topk_ids when an id lies outside [0, num_experts) (one host sync on a GPU)."""
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    if bool(bad.any()):
        value = int(topk_ids[bad][0])
        raise ValueError(f"topk_ids: {int(bad.sum())} expert id(s) outside [0, {num_experts}), e.g. {value}")


def combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[tokens * top_k, H] weighted rows -> [tokens, H] in y's dtype: fp32 sum in slot order, one rounding; the
    rows of slots whose id in topk_ids [tokens, top_k] is outside [0, num_experts) are left out."""
    H = y.shape[1]
    tokens, top_k = topk_ids.shape
    out = torch.empty(tokens, H, dtype=y.dtype, device=y.device)
    tile = configs.COMBINE
    _combine[(tokens, triton.cdiv(H, tile.block_n))](y, topk_ids.contiguous(), out, num_experts, H=H, TOP_K=top_k,
                                                     BLOCK_H=tile.block_n, **_launch_opts(tile))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tuning (on a GPU: benchmarks/gpu_suite.py --tune)


def kernel_launchers(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tables: ExpertTables, *,
                     block_m: int = 16) -> dict:
    """One callable per kernel of the family, each launching just that kernel on these inputs with a given
    `triton_configs.Tile` and returning what Triton's launch returns (the compiled kernel, with n_regs / n_spills
    on a GPU): {"gemm1", "gemm2" (sorted path, rows aligned to block_m), "gemv1", "gemv2" (decode path),
    "combine"}, and "buffers": GEMM1 / GEMV1 write act_out, GEMM2 / GEMV2 read act_in (placeholder activations:
    timing only) and write y, the combine reads y and writes out. Allocated once."""
    T, H = x.shape
    k, I, E = topk_ids.shape[1], tables.inter, tables.num_experts
    x = x.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    act = torch.randn(T * k, I, device=x.device).to(x.dtype) * 0.1
    y = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    consts = dict(H=H, I=I, INT4=tables.int4, ZERO_OFFSET=tables.zero_offset, W_DTYPE=TL_DTYPES[tables.w_dtype])
    sorted_slots, block_experts = align(topk_ids, E, block_m)
    grid_m = block_experts.numel()
    precision = dot_precision(x.dtype)
    scratch = torch.empty_like(act)

    def gemm1(tile):
        return _gemm1[(grid_m, triton.cdiv(I, tile.block_n))](
            x, tables.table, scratch, sorted_slots, block_experts, T * k, E, TOP_K=k, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, **consts, **_launch_opts(tile))

    def gemm2(tile):
        return _gemm2[(grid_m, triton.cdiv(H, tile.block_n))](
            act, tables.table, weights, y, sorted_slots, block_experts, T * k, E, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, **consts, **_launch_opts(tile))

    def gemv1(tile):
        return _decode_gemm1[(T * k, triton.cdiv(I, tile.block_n))](
            x, tables.table, ids, scratch, E, TOP_K=k, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, **consts,
            **_launch_opts(tile))

    def gemv2(tile):
        return _decode_gemm2[(T * k, triton.cdiv(H, tile.block_n))](
            act, tables.table, ids, weights, y, E, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, **consts,
            **_launch_opts(tile))

    def combine_(tile):
        return _combine[(T, triton.cdiv(H, tile.block_n))](y, ids, out, E, H=H, TOP_K=k, BLOCK_H=tile.block_n,
                                                           **_launch_opts(tile))

    return dict(gemm1=gemm1, gemm2=gemm2, gemv1=gemv1, gemv2=gemv2, combine=combine_,
                buffers=dict(act_out=scratch, act_in=act, y=y, out=out))


def _random_int4_linear(k: int, n: int, group: int, device, scales_dtype=torch.float16) -> Int4Linear:
    g = torch.Generator(device="cpu").manual_seed(k * 31 + n)
    groups = k // group
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // PACK, n), dtype=torch.int32, generator=g)
    qzeros = torch.full((groups, n // PACK), 0x77777777, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).to(scales_dtype)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    return tuple(t.to(device) for t in (qweight, qzeros, scales, g_idx))


def tune(path: str, *, tokens: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
         hidden: int = 2048, inter: int = 1408, num_experts: int = 60, top_k: int = 4, group: int = 128,
         classes: Sequence[str] = ("16bit", "int4"), linear_rows: Sequence[int] = (1, 16, 64, 256, 1024),
         decode_max_tokens: int = 4, repeats: int = 10, log=print) -> dict:
    """Time the candidate tiles (triton_configs.candidates) of every kernel on this GPU, at this layer shape, for
    bf16 activations with dense ("16bit") and 4-bit ("int4") experts, and write the table they pick
    (triton_configs.write_table) to `path`, the JSON file env QWEN2_MOE_HF_TRITON_CONFIGS can name. Candidates that
    spill registers or do not fit shared memory are skipped. Only this GPU's generation changes; fp32 (not a
    performance path) keeps the built-in entries. Returns the JSON written."""
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    gen = configs.generation(capability)
    timings = []
    start = _time.perf_counter()

    def measure(fn):
        kernel = fn()  # compiles; the returned kernel knows its spills once loaded
        torch.cuda.synchronize()
        if getattr(kernel, "n_spills", 0):
            return None
        for _ in range(2):
            fn()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / repeats

    def attempt(fn):
        try:
            return measure(fn)
        except Exception as e:  # noqa: BLE001  (OutOfResources and compile failures: not a candidate here)
            log(f"  skipped: {type(e).__name__}: {str(e)[:120]}")
            return None

    gen_ = torch.Generator(device="cpu").manual_seed(0)
    for cls in classes:
        int4 = cls == "int4"
        dtype = torch.bfloat16
        if int4:
            bank = [[_random_int4_linear(*shape, group, device) for _ in range(num_experts)]
                    for shape in ((hidden, inter), (hidden, inter), (inter, hidden))]
        else:
            bank = [[(torch.randn(*shape, generator=gen_) / shape[1] ** 0.5).to(device, dtype)
                     for _ in range(num_experts)] for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
        tables = expert_tables(*bank, int4=int4, zero_offset=1 if int4 else 0, device=device)
        for t in tokens:
            x = torch.randn(t, hidden, generator=gen_).to(device, dtype)
            logits = torch.randn(t, num_experts, generator=gen_)
            w, ids = torch.softmax(logits, -1).topk(top_k, -1)
            ids, w = ids.to(device), w.to(device, dtype)
            slots = configs.slots_per_expert(t, top_k, num_experts)
            if t <= decode_max_tokens:
                launch = kernel_launchers(x, ids, w, tables)
                for kernel in ("gemv1", "gemv2"):
                    for _, tile in configs.candidates(kernel, cls):
                        ms = attempt(lambda: launch[kernel](tile))
                        if ms is not None:
                            timings.append(configs.Timing(kernel, gen, cls, t, 0, tile, ms))
                continue
            for block_m in sorted({m for m, _ in configs.candidates("gemm1", cls)}):
                launch = kernel_launchers(x, ids, w, tables, block_m=block_m)
                for kernel in ("gemm1", "gemm2"):
                    for m, tile in configs.candidates(kernel, cls):
                        if m == block_m:
                            ms = attempt(lambda: launch[kernel](tile))
                            if ms is not None:
                                timings.append(configs.Timing(kernel, gen, cls, slots, block_m, tile, ms))
            log(f"{cls} {t} tokens: {len(timings)} timings, {_time.perf_counter() - start:.0f} s")
        del bank, tables
        torch.cuda.empty_cache()
    for rows in linear_rows:
        lin = _random_int4_linear(hidden, hidden, group, device)
        x = torch.randn(rows, hidden, generator=gen_).to(device, torch.bfloat16)
        for block_m, tile in configs.candidates("int4_linear", "int4"):
            cfg = configs.LinearConfig(block_m, tile)
            ms = attempt(lambda: gptq_linear_triton(x, *lin, config=cfg))
            if ms is not None:
                timings.append(configs.Timing("int4_linear", gen, "int4", rows, block_m, tile, ms))
        log(f"int4_linear {rows} rows: {len(timings)} timings, {_time.perf_counter() - start:.0f} s")
    meta = dict(device=torch.cuda.get_device_name(device), capability=list(capability), triton=triton.__version__,
                torch=torch.__version__, shape=dict(hidden=hidden, inter=inter, experts=num_experts, top_k=top_k),
                seconds=round(_time.perf_counter() - start))
    return configs.write_table(timings, path, meta=meta)
