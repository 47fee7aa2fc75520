"""Triton kernels for the routed experts (GPU; tested on CPU under TRITON_INTERPRET=1 in fp16 / fp32).

The vLLM fused-MoE shape of the computation, written for this model:
  align (csrc moe_align: slots sorted by expert, padded to BLOCK_M) ->
  GEMM1: act[slot] = silu(x[token] @ W_gate[e]^T) * (x[token] @ W_up[e]^T)      (SiLU*up fused, one kernel)
  GEMM2: y[slot]   = weight[slot] * (act[slot] @ W_down[e]^T)                   (routing weight fused)
  combine: out[t] = sum_j y[t*k + j] (+ gated shared expert)

Expert weights stay where the model keeps them (one tensor per expert, the hub's layout): the kernels read them
through a table of per-expert base addresses, so nothing is stacked or copied. A decode path for a few tokens
skips the sort: one program per (slot, output tile).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def block_slots(sorted_slots, block_experts, num_slots, BLOCK_M: tl.constexpr):
    """The expert of this program's row block (-1: a padding block past the used length), its slots, which of
    them are real, and the slots made safe to index with (0 where not real). Shared by every grouped kernel."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts + pid_m)
    slots = tl.load(sorted_slots + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    return expert, slots, valid, tl.where(valid, slots, 0)


@triton.jit
def _gemm1_silu_mul(
    x_ptr, gate_table, up_table, act_ptr, sorted_slots, block_experts, num_slots,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:  # a padding block past the used length
        return
    tokens = safe // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_gate = tl.load(gate_table + expert).to(tl.pointer_type(x_ptr.dtype.element_ty))
    w_up = tl.load(up_table + expert).to(tl.pointer_type(x_ptr.dtype.element_ty))
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + tokens[:, None] * H + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        # W is [I, H] row-major: the tile W[cols, ks] read as [BLOCK_K, BLOCK_N] for a @ W^T.
        wg = tl.load(w_gate + cols[None, :] * H + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w_up + cols[None, :] * H + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slots[:, None] * I + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _gemm2_weighted(
    act_ptr, down_table, weights_ptr, y_ptr, sorted_slots, block_experts, num_slots,
    H: tl.constexpr, I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    expert, slots, valid, safe = block_slots(sorted_slots, block_experts, num_slots, BLOCK_M)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_down = tl.load(down_table + expert).to(tl.pointer_type(act_ptr.dtype.element_ty))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + safe[:, None] * I + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_down + cols[None, :] * I + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
    route_w = tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    tl.store(y_ptr + safe[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _decode_gemm1(
    x_ptr, gate_table, up_table, ids_ptr, act_ptr,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (slot, tile of I): no sort, each weight tile read once per slot (decode: a few tokens).
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + slot)
    token = slot // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_gate = tl.load(gate_table + expert).to(tl.pointer_type(x_ptr.dtype.element_ty))
    w_up = tl.load(up_table + expert).to(tl.pointer_type(x_ptr.dtype.element_ty))
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + token * H + ks, mask=k_ok, other=0.0).to(tl.float32)
        wg = tl.load(w_gate + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(w_up + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * a[None, :], axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * a[None, :], axis=1)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + slot * I + cols, act.to(act_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _decode_gemm2(
    act_ptr, down_table, ids_ptr, weights_ptr, y_ptr,
    H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + slot)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_down = tl.load(down_table + expert).to(tl.pointer_type(act_ptr.dtype.element_ty))
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(act_ptr + slot * I + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_down + cols[:, None] * I + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    acc = acc * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * H + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def pointer_table(tensors, device):
    """int64 tensor of the tensors' base addresses (the kernels' view of per-expert weights)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def align(topk_ids, num_experts, block_m):
    """csrc moe_align's contract (fixed upper-bound sizes, unused blocks have expert -1): the compiled op when it is
    built for this device, else the same in torch."""
    op = getattr(torch.ops.qwen2_moe_hf, "moe_align", None)
    key = "CUDA" if topk_ids.is_cuda else "CPU"
    if op is not None and torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::moe_align", key):
        sorted_slots, block_experts, _ = op(topk_ids, num_experts, block_m)
        return sorted_slots, block_experts
    return align_torch(topk_ids, num_experts, block_m)


def align_torch(topk_ids, num_experts, block_m):
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


def routed_experts(x, topk_ids, topk_weights, gate_ws, up_ws, down_ws, decode_max_tokens=4,
                   block_m=16, block_n=32, block_k=32):
    """Weighted routed-expert outputs per slot, summed per token: [T, H] in x's dtype."""
    T, H = x.shape
    k = topk_ids.shape[1]
    I = gate_ws[0].shape[0]
    E = len(gate_ws)
    device = x.device
    x = x.contiguous()
    tables = [pointer_table(ws, device) for ws in (gate_ws, up_ws, down_ws)]
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, I, dtype=x.dtype, device=device)
    y = torch.empty(T * k, H, dtype=x.dtype, device=device)
    if T <= decode_max_tokens:
        ids = topk_ids.reshape(-1).contiguous()
        _decode_gemm1[(T * k, triton.cdiv(I, block_n))](
            x, tables[0], tables[1], ids, act, H=H, I=I, TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k)
        _decode_gemm2[(T * k, triton.cdiv(H, block_n))](
            act, tables[2], ids, weights, y, H=H, I=I, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        sorted_slots, block_experts = align(topk_ids, E, block_m)
        grid_m = block_experts.numel()
        _gemm1_silu_mul[(grid_m, triton.cdiv(I, block_n))](
            x, tables[0], tables[1], act, sorted_slots, block_experts, T * k,
            H=H, I=I, TOP_K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        _gemm2_weighted[(grid_m, triton.cdiv(H, block_n))](
            act, tables[2], weights, y, sorted_slots, block_experts, T * k,
            H=H, I=I, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(T, k, H).float().sum(1).to(x.dtype)
