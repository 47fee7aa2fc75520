"""Triton kernels that read 4-bit GPTQ weights directly: one quantized Linear, and the routed experts of a MoE layer.

GPU kernels; tested on CPU under TRITON_INTERPRET=1 in fp16 / fp32 (the interpreter reads bf16 wrongly).

Layout read (format.py, AutoGPTQ's): for a Linear(K -> N)
  qweight int32 [K/8, N]   nibble j of qweight[r, n] is q[8r + j, n]           (input rows packed, N contiguous)
  qzeros  int32 [G, N/8]   nibble j of qzeros[g, c] is the zero of column 8c + j
  scales  float [G, N]     fp16 / bf16 / fp32, independent of x's dtype (converted in the kernel)
  g_idx   int32 [K]        the group of each input row: k // group_size, or any order (act-order / desc_act)
  W[n, k] = scales[g, n] * (q[k, n] - (zero[g, n] + zero_offset)),  g = g_idx[k];  zero_offset 1: "gptq" (v1),
  0: "gptq_v2".

Why dequantize inside the GEMM: the point of int4 is to read a quarter of the bytes. Each K-tile of the weight is
unpacked, shifted by its zeros and scaled in registers (fp32), cast to x's dtype and fed to tl.dot, which
accumulates in fp32; the full-precision weight never exists in memory. Since g_idx may be any order, the group of
each input row is looked up per row (g_idx[k]) and its scale / zero gathered; with the usual ordered g_idx the
gathered rows repeat and come from cache, so the extra cost is load instructions, not memory traffic.

The experts use the structure of moe/triton_kernels.py (the bf16 path): align (slots sorted by expert, padded to
BLOCK_M) -> GEMM1 (gate and up dequantized, SiLU(gate) * up fused) -> GEMM2 (down dequantized, routing weight
fused) -> sum over the top-k. Each expert keeps its own four tensors where the model keeps them; the kernels read
them through one int64 table of base addresses [3 linears (gate, up, down), 4 tensors, E experts], built once and
cached. A decode path for a few tokens skips the sort: one program per (slot, output tile).
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ..moe import triton_kernels

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PACK = 8  # 4-bit values per int32


# ---------------------------------------------------------------------------------------------------------------
# Shared device helpers

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
def _expert_tensors(table, linear, expert, num_experts, SCALE_DTYPE: tl.constexpr):
    """Base pointers of one expert's (qweight, qzeros, scales, g_idx) for linear 0 (gate), 1 (up) or 2 (down)."""
    row = table + linear * 4 * num_experts + expert
    qw = tl.load(row).to(tl.pointer_type(tl.int32))
    qz = tl.load(row + num_experts).to(tl.pointer_type(tl.int32))
    sc = tl.load(row + 2 * num_experts).to(tl.pointer_type(SCALE_DTYPE))
    gi = tl.load(row + 3 * num_experts).to(tl.pointer_type(tl.int32))
    return qw, qz, sc, gi


# ---------------------------------------------------------------------------------------------------------------
# One quantized Linear

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


def _dot_precision(dtype):
    # fp32 stays fp32 on tensor cores ("ieee"; the default would round operands to tf32); fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_bits_and_offset(bits, zero_offset):
    if bits != 4:
        raise ValueError(f"bits: the Triton GPTQ kernels read 4-bit weights only, got bits={bits!r}")
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset: expected 1 (gptq / v1) or 0 (gptq_v2), got {zero_offset!r}")


def _check_linear(name, qweight, qzeros, scales, g_idx, device):
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
    if scales.dtype not in _TL_DTYPES:
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


def gptq_linear_triton(x, qweight, qzeros, scales, g_idx, bits=4, zero_offset=1, bias=None, *, block_n=64,
                       block_k=64):
    """y = x @ W^T (+ bias) with W the dequantized 4-bit GPTQ weight, dequantized tile by tile inside the kernel.

    x [..., K] fp16 / bf16 / fp32 on the tensors' device -> y [..., N] in x's dtype (fp32 accumulation). g_idx may
    be in any order (act-order); its values are trusted to lie in [0, groups) (not checked: that would sync).
    """
    _check_bits_and_offset(bits, zero_offset)
    if not isinstance(x, torch.Tensor) or x.dtype not in _TL_DTYPES:
        raise ValueError(f"x: expected a float16, bfloat16 or float32 tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    k, n = _check_linear("", qweight, qzeros, scales, g_idx, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x: last dimension {x.shape[-1]}, expected in_features {k} (qweight has {k // PACK} rows)")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != x.device):
        raise ValueError(f"bias: shape {tuple(bias.shape)} on {bias.device}, expected ({n},) on {x.device}")
    if block_k % PACK or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_k {block_k} / block_n {block_n}: powers of two expected, block_k a multiple of 8")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64  # tl.dot needs >= 16 rows; decode wastes the rest
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _int4_linear[grid](
            x2, qweight, qzeros, scales, g_idx, bias.contiguous() if bias is not None else y, y, m, n, k,
            ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------------------------
# Routed experts: sorted path (many tokens)

@triton.jit
def _gemm1_int4(
    x_ptr, table, act_ptr, sorted_slots, block_experts, num_slots, num_experts,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    SCALE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = triton_kernels.block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:  # a padding block past the used length
        return
    tokens = safe // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    g_qw, g_qz, g_sc, g_gi = _expert_tensors(table, 0, expert, num_experts, SCALE_DTYPE)
    u_qw, u_qz, u_sc, u_gi = _expert_tensors(table, 1, expert, num_experts, SCALE_DTYPE)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + tokens[:, None] * H + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = _dequant_tile(g_qw, g_qz, g_sc, g_gi, ks, cols, k_ok, n_ok, I, ZERO_OFFSET)
        wu = _dequant_tile(u_qw, u_qz, u_sc, u_gi, ks, cols, k_ok, n_ok, I, ZERO_OFFSET)
        acc_g = tl.dot(a, wg.to(x_ptr.dtype.element_ty), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, wu.to(x_ptr.dtype.element_ty), acc_u, input_precision=DOT_PRECISION)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slots[:, None] * I + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _gemm2_int4(
    act_ptr, table, weights_ptr, y_ptr, sorted_slots, block_experts, num_slots, num_experts,
    H: tl.constexpr, I: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    SCALE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = triton_kernels.block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < H
    d_qw, d_qz, d_sc, d_gi = _expert_tensors(table, 2, expert, num_experts, SCALE_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + safe[:, None] * I + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = _dequant_tile(d_qw, d_qz, d_sc, d_gi, ks, cols, k_ok, n_ok, H, ZERO_OFFSET)
        acc = tl.dot(a, w.to(act_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + safe[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Routed experts: decode path (a few tokens, no sort)

@triton.jit
def _decode_gemm1_int4(
    x_ptr, table, ids_ptr, act_ptr, num_experts,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, ZERO_OFFSET: tl.constexpr, SCALE_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (slot, tile of I): a vector-matrix product, so no tl.dot padding to 16 rows.
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + slot)
    token = slot // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    g_qw, g_qz, g_sc, g_gi = _expert_tensors(table, 0, expert, num_experts, SCALE_DTYPE)
    u_qw, u_qz, u_sc, u_gi = _expert_tensors(table, 1, expert, num_experts, SCALE_DTYPE)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + token * H + ks, mask=k_ok, other=0.0).to(tl.float32)
        wg = _dequant_tile(g_qw, g_qz, g_sc, g_gi, ks, cols, k_ok, n_ok, I, ZERO_OFFSET)
        wu = _dequant_tile(u_qw, u_qz, u_sc, u_gi, ks, cols, k_ok, n_ok, I, ZERO_OFFSET)
        acc_g += tl.sum(wg * a[:, None], axis=0)
        acc_u += tl.sum(wu * a[:, None], axis=0)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slot * I + cols, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _decode_gemm2_int4(
    act_ptr, table, ids_ptr, weights_ptr, y_ptr, num_experts,
    H: tl.constexpr, I: tl.constexpr, ZERO_OFFSET: tl.constexpr, SCALE_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + slot)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < H
    d_qw, d_qz, d_sc, d_gi = _expert_tensors(table, 2, expert, num_experts, SCALE_DTYPE)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + slot * I + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = _dequant_tile(d_qw, d_qz, d_sc, d_gi, ks, cols, k_ok, n_ok, H, ZERO_OFFSET)
        acc += tl.sum(w * a[:, None], axis=0)
    acc = acc * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * H + cols, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------------
# Host side: address tables (cached) and the entry point

_TABLES = OrderedDict()  # key -> (table int64 [3, 4, E], scales dtype)
_TABLE_CACHE_SIZE = 64  # a model has one entry per MoE layer (24 for Qwen1.5-MoE); bounded so stale ones go


def clear_table_cache():
    """Forget every cached address table. Needed only when, outside GPTQLinear (which bumps
    GPTQLinear.generation, part of the key), an expert's tensor other than the first or last of a list is replaced
    by a different tensor (in-place updates such as load_state_dict keep the addresses)."""
    _TABLES.clear()


def _table_key(linears, device):
    # The first and last expert's addresses plus the count, for each of the 3 x 4 lists: cheap enough to compute
    # on every call (the full 4 x 3 x 60 addresses cost ~0.1 ms of Python), and distinct per layer. First-entry
    # shapes and dtype catch a different model reusing the same addresses; GPTQLinear.generation moves whenever
    # a GPTQ layer's tensors are replaced (a new layer, .to(), a new buffer), so a swapped middle expert is seen.
    from .linear import GPTQLinear

    key = [GPTQLinear.generation, str(device), tuple(linears[0][0][0].shape), tuple(linears[0][0][2].shape), tuple(linears[2][0][0].shape),
           tuple(linears[2][0][2].shape), linears[0][0][2].dtype]
    for entries in linears:
        key.append(len(entries))
        key.extend(t.data_ptr() for t in entries[0])
        key.extend(t.data_ptr() for t in entries[-1])
    return tuple(key)


def _build_table(linears, device):
    """Check every expert's tensors (once per table) and gather their addresses into int64 [3, 4, E]."""
    names = ("gate", "up", "down")
    num_experts = len(linears[0])
    shapes = {}
    scale_dtype = None
    for name, entries in zip(names, linears):
        if len(entries) != num_experts:
            raise ValueError(f"{name}: {len(entries)} experts, but gate has {num_experts}")
        for e, entry in enumerate(entries):
            if not isinstance(entry, (tuple, list)) or len(entry) != 4:
                raise ValueError(f"{name}[{e}]: expected a tuple (qweight, qzeros, scales, g_idx)")
            _check_linear(f"{name}[{e}]", *entry, device)
            shape = tuple(tuple(t.shape) for t in entry)
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}[{e}]: tensor shapes {shape} differ from {name}[0]'s {shapes[name]}")
            scale_dtype = scale_dtype or entry[2].dtype
            if entry[2].dtype != scale_dtype:
                raise ValueError(f"{name}[{e}].scales: dtype {entry[2].dtype}, but gate[0].scales is {scale_dtype}")
    if shapes["gate"] != shapes["up"]:
        raise ValueError(f"up: tensor shapes {shapes['up']} differ from gate's {shapes['gate']}")
    hidden, inter = shapes["gate"][3][0], shapes["gate"][0][1]
    if shapes["down"][0] != (inter // PACK, hidden) or shapes["down"][3] != (inter,):
        raise ValueError(f"down: qweight {shapes['down'][0]}, expected ({inter // PACK}, {hidden}) for "
                         f"Linear({inter} -> {hidden})")
    addresses = [[[t.data_ptr() for t in (entry[j] for entry in entries)] for j in range(4)] for entries in linears]
    return torch.tensor(addresses, dtype=torch.int64, device=device), scale_dtype


def _expert_table(linears, device):
    key = _table_key(linears, device)
    cached = _TABLES.get(key)
    if cached is None:
        cached = _build_table(linears, device)
        _TABLES[key] = cached
        while len(_TABLES) > _TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    return cached


def routed_experts_int4(hidden_states, topk_ids, topk_weights, gate, up, down, zero_offset=1, *,
                        decode_max_tokens=4, block_m=None, block_n=64, block_k=64):
    """Weighted sum over the top-k routed experts (no shared expert) with 4-bit GPTQ expert weights: [T, H] in
    hidden_states' dtype.

    hidden_states [T, H]; topk_ids, topk_weights [T, k]; gate, up, down: one (qweight, qzeros, scales, g_idx) per
    expert (gate / up: Linear(H -> I), down: Linear(I -> H)), all experts of one linear the same shapes, scales
    one dtype (may differ from hidden_states'). The address tables are cached per layer (see clear_table_cache).
    """
    _check_bits_and_offset(4, zero_offset)
    x = hidden_states
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _TL_DTYPES:
        raise ValueError("hidden_states: expected a 2-D [tokens, hidden] float16, bfloat16 or float32 tensor")
    for name, entries in (("gate", gate), ("up", up), ("down", down)):
        if not len(entries):
            raise ValueError(f"{name}: no experts")
        for e in (0, len(entries) - 1):  # the ones the cache key reads; _build_table checks them all
            entry = entries[e]
            if not (isinstance(entry, (tuple, list)) and len(entry) == 4 and
                    all(isinstance(t, torch.Tensor) for t in entry)):
                raise ValueError(f"{name}[{e}]: expected a tuple of tensors (qweight, qzeros, scales, g_idx)")
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: shape {tuple(topk_ids.shape)}, expected [{T}, top_k]")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: shape {tuple(topk_weights.shape)}, expected {tuple(topk_ids.shape)}")
    if gate[0][0].shape[0] * PACK != H:
        raise ValueError(f"hidden_states: hidden size {H}, but gate[0].qweight holds {gate[0][0].shape[0] * PACK}"
                         f" input rows")
    if block_k % PACK or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_k {block_k} / block_n {block_n}: powers of two expected, block_k a multiple of 8")
    table, scale_dtype = _expert_table((gate, up, down), x.device)
    E = len(gate)
    k = topk_ids.shape[1]
    I = gate[0][0].shape[1]
    if T == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    consts = dict(H=H, I=I, ZERO_OFFSET=zero_offset, SCALE_DTYPE=_TL_DTYPES[scale_dtype])
    if T <= decode_max_tokens:
        ids = topk_ids.reshape(-1).contiguous()
        _decode_gemm1_int4[(T * k, triton.cdiv(I, block_n))](
            x, table, ids, act, E, TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
        _decode_gemm2_int4[(T * k, triton.cdiv(H, block_n))](
            act, table, ids, weights, y, E, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
    else:
        if block_m is None:  # rows per block ~ slots per expert: small blocks waste less padding at low counts
            per_expert = T * k / E
            block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
        sorted_slots, block_experts = triton_kernels.align(topk_ids, E, block_m)
        grid_m = block_experts.numel()
        precision = _dot_precision(x.dtype)
        _gemm1_int4[(grid_m, triton.cdiv(I, block_n))](
            x, table, act, sorted_slots, block_experts, T * k, E, TOP_K=k, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
        _gemm2_int4[(grid_m, triton.cdiv(H, block_n))](
            act, table, weights, y, sorted_slots, block_experts, T * k, E, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
    return y.view(T, k, H).float().sum(1).to(x.dtype)
