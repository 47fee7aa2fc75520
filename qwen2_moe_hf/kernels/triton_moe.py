"""Triton kernels (GPU; tested on CPU under TRITON_INTERPRET=1 in fp16 / fp32, whose interpreter reads bf16 wrongly).

One family for the routed experts, in vLLM's fused-MoE shape, where dense and GPTQ 4-bit weights differ only in how
a weight tile is loaded (`_weight_tile`, a `tl.constexpr` INT4 choice):
  align (csrc moe_align: slots sorted by expert, padded to BLOCK_M) ->
  GEMM1: act[slot] = silu(x[token] @ W_gate[e]^T) * (x[token] @ W_up[e]^T)      (SiLU*up fused, one kernel)
  GEMM2: y[slot]   = weight[slot] * (act[slot] @ W_down[e]^T)                   (routing weight fused)
  combine: out[t] = sum_j y[t*k + j]
and a decode path for a few tokens that skips the sort: one program per (slot, output tile).

Expert weights stay where the model keeps them (the hub's layout, one tensor per expert and projection): the
kernels read them through a table of base addresses, int64 [3 projections (gate, up, down), 4 parts, E experts],
built once per layer (`expert_tables`) and kept by the layer's prepared weights. Dense weights use part 0 (the
[out, in] weight); GPTQ uses qweight, qzeros, scales, g_idx, read as (gptq/format.py)
  W[n, k] = scales[g, n] * (q[k, n] - (zero[g, n] + zero_offset)),  g = g_idx[k]
dequantized per tile in registers (fp32), never in memory. Also here: one GPTQ Linear (`gptq_linear_triton`).
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PACK = 8  # 4-bit values per int32
Int4Linear = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # qweight, qzeros, scales, g_idx


# ---------------------------------------------------------------------------------------------------------------
# Device helpers


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
def _dequant_tile(qw, qz, sc, gi, ks, cols, k_ok, n_ok, N, ZERO_OFFSET: tl.constexpr):
    """W^T[ks, cols] as fp32 [BLOCK_K, BLOCK_N] from one Linear's GPTQ tensors (N: its out_features)."""
    mask = k_ok[:, None] & n_ok[None, :]
    g = tl.load(gi + ks, mask=k_ok, other=0)
    # Each int32 is loaded once per row it holds (8 times): the repeats hit cache, and the tile stays 2-D.
    packed = tl.load(qw + (ks // 8)[:, None] * N + cols[None, :], mask=mask, other=0)
    q = (packed >> ((ks % 8) * 4)[:, None]) & 0xF
    zp = tl.load(qz + g[:, None] * (N // 8) + (cols // 8)[None, :], mask=mask, other=0)
    zero = ((zp >> ((cols % 8) * 4)[None, :]) & 0xF) + ZERO_OFFSET  # nibble masked before the offset, as format.py
    scale = tl.load(sc + g[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return (q - zero).to(tl.float32) * scale  # masked entries: scale 0 -> weight 0


@triton.jit
def _weight_tile(table, linear, expert, num_experts, ks, cols, k_ok, n_ok, N, K,
                 INT4: tl.constexpr, ZERO_OFFSET: tl.constexpr, W_DTYPE: tl.constexpr):
    """W^T[ks, cols] ([BLOCK_K, BLOCK_N]) of projection `linear` (0 gate, 1 up, 2 down: Linear(K -> N)) of
    `expert`: the only place where dense and 4-bit weights differ. Dense: the [N, K] weight in W_DTYPE; int4:
    dequantized to fp32 (W_DTYPE is then the scales' dtype)."""
    row = table + linear * 4 * num_experts + expert
    if INT4:
        qw = tl.load(row).to(tl.pointer_type(tl.int32))
        qz = tl.load(row + num_experts).to(tl.pointer_type(tl.int32))
        sc = tl.load(row + 2 * num_experts).to(tl.pointer_type(W_DTYPE))
        gi = tl.load(row + 3 * num_experts).to(tl.pointer_type(tl.int32))
        return _dequant_tile(qw, qz, sc, gi, ks, cols, k_ok, n_ok, N, ZERO_OFFSET)
    else:
        w = tl.load(row).to(tl.pointer_type(W_DTYPE))
        return tl.load(w + cols[None, :] * K + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)


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
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + tokens[:, None] * H + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = _weight_tile(table, 0, expert, num_experts, ks, cols, k_ok, n_ok, I, H, INT4, ZERO_OFFSET, W_DTYPE)
        wu = _weight_tile(table, 1, expert, num_experts, ks, cols, k_ok, n_ok, I, H, INT4, ZERO_OFFSET, W_DTYPE)
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + safe[:, None] * I + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(table, 2, expert, num_experts, ks, cols, k_ok, n_ok, H, I, INT4, ZERO_OFFSET, W_DTYPE)
        acc = tl.dot(a, w.to(act_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + safe[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
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
    expert = tl.load(ids_ptr + slot)
    token = slot // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + token * H + ks, mask=k_ok, other=0.0).to(tl.float32)
        wg = _weight_tile(table, 0, expert, num_experts, ks, cols, k_ok, n_ok, I, H, INT4, ZERO_OFFSET, W_DTYPE)
        wu = _weight_tile(table, 1, expert, num_experts, ks, cols, k_ok, n_ok, I, H, INT4, ZERO_OFFSET, W_DTYPE)
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
    expert = tl.load(ids_ptr + slot)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + slot * I + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = _weight_tile(table, 2, expert, num_experts, ks, cols, k_ok, n_ok, H, I, INT4, ZERO_OFFSET, W_DTYPE)
        acc += tl.sum(w.to(tl.float32) * a[:, None], axis=0)
    acc = acc * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * H + cols, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


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
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _dequant_tile(qw, qz, sc, gi, ks, cols, k_ok, n_ok, N, ZERO_OFFSET)
        acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
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


def gptq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       g_idx: torch.Tensor, bits: int = 4, zero_offset: int = 1, bias: Optional[torch.Tensor] = None,
                       *, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W the dequantized 4-bit GPTQ weight, dequantized tile by tile inside the kernel.

    x [..., K] fp16 / bf16 / fp32 on the tensors' device -> y [..., N] in x's dtype (fp32 accumulation). g_idx may
    be in any order (act-order); its values are trusted to lie in [0, groups) (not checked: that would sync).
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
    _check_blocks(block_n, block_k)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64  # tl.dot needs >= 16 rows; decode wastes the rest
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _int4_linear[grid](
            x2, qweight, qzeros, scales, g_idx, bias.contiguous() if bias is not None else y, y, m, n, k,
            ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
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
    """moe_align in plain torch ops (any device, no host sync)."""
    slots = topk_ids.numel()
    flat = topk_ids.reshape(-1)
    device = flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    starts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    starts[1:] = torch.cumsum(counts, 0)
    max_blocks = -(-(slots + num_experts * (block_m - 1)) // block_m)
    sorted_slots = torch.full((max_blocks * block_m,), slots, dtype=torch.int32, device=device)
    expert_of = flat[order]
    sorted_slots[offsets[expert_of] + torch.arange(slots, device=device) - starts[expert_of]] = order.to(torch.int32)
    block_of = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(offsets[1:], block_of, right=True).to(torch.int32)
    block_experts[block_of >= offsets[-1]] = -1
    return sorted_slots, block_experts


def routed_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tables: ExpertTables, *,
                   decode_max_tokens: int = 4, block_m: Optional[int] = None, block_n: Optional[int] = None,
                   block_k: Optional[int] = None) -> torch.Tensor:
    """The weighted sum over each token's top-k routed experts (no shared expert): x [T, H] -> [T, H] in x's dtype.

    Tiles: dense 16 x 32 x 32; int4 64-wide N and K tiles, and rows per block following the slots per expert."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in TL_DTYPES:
        raise ValueError("x: expected a 2-D [tokens, hidden] float16, bfloat16 or float32 tensor")
    T, H = x.shape
    if H != tables.hidden:
        raise ValueError(f"x: hidden size {H}, but the experts take {tables.hidden} inputs")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: shape {tuple(topk_ids.shape)}, expected [{T}, top_k]")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: shape {tuple(topk_weights.shape)}, expected {tuple(topk_ids.shape)}")
    if not tables.int4 and tables.w_dtype != x.dtype:
        raise ValueError(f"x: dtype {x.dtype}, but the expert weights are {tables.w_dtype}")
    if tables.table.device != x.device:
        raise ValueError(f"x: on {x.device}, but the expert weights are on {tables.table.device}")
    block_n = block_n or (64 if tables.int4 else 32)
    block_k = block_k or (64 if tables.int4 else 32)
    _check_blocks(block_n, block_k)
    k, I, E = topk_ids.shape[1], tables.inter, tables.num_experts
    if T == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    consts = dict(H=H, I=I, INT4=tables.int4, ZERO_OFFSET=tables.zero_offset, W_DTYPE=TL_DTYPES[tables.w_dtype])
    if T <= decode_max_tokens:
        ids = topk_ids.reshape(-1).contiguous()
        _decode_gemm1[(T * k, triton.cdiv(I, block_n))](
            x, tables.table, ids, act, E, TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
        _decode_gemm2[(T * k, triton.cdiv(H, block_n))](
            act, tables.table, ids, weights, y, E, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
    else:
        if block_m is None:
            if tables.int4:  # rows per block ~ slots per expert: small blocks waste less padding at low counts
                per_expert = T * k / E
                block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
            else:
                block_m = 16
        sorted_slots, block_experts = align(topk_ids, E, block_m)
        grid_m = block_experts.numel()
        precision = dot_precision(x.dtype)
        _gemm1[(grid_m, triton.cdiv(I, block_n))](
            x, tables.table, act, sorted_slots, block_experts, T * k, E, TOP_K=k, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
        _gemm2[(grid_m, triton.cdiv(H, block_n))](
            act, tables.table, weights, y, sorted_slots, block_experts, T * k, E, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
    return y.view(T, k, H).float().sum(1).to(x.dtype)
