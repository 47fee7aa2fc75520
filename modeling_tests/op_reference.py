"""Plain-torch references for every compiled op, on the op's own arguments (tensors, lists of per-expert tensors):
the oracles of the boundary table (test_op_boundaries.py) and the property tests (test_op_properties.py).

Everything is computed in float32 from the arguments' values, whatever their dtype or layout, and returned in the
op's output dtype. int4 weights are dequantized by qwen2_moe_hf.gptq.format.dequantize (torch code, not the C++
kernels under test)."""

import torch
import torch.nn.functional as F

from qwen2_moe_hf.gptq.format import dequantize
from qwen2_moe_hf.moe.routing import route

from helpers import row_error  # noqa: F401  (the comparison every op test uses)


def topk_softmax(logits, k, renormalize):
    """route()'s order (larger fp32 logit first, NaN probabilities first, ties by the lower id) with the weights
    left in float32."""
    probs = torch.softmax(logits.float(), dim=-1)
    key = logits.float().masked_fill(probs.isnan(), float("inf"))
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def moe_align(ids, num_experts, block):
    flat = ids.reshape(-1).tolist()
    sorted_slots, block_experts, offsets = [], [], [0]
    for e in range(num_experts):
        group = [s for s, x in enumerate(flat) if x == e]
        pad = -len(group) % block
        sorted_slots += group + [len(flat)] * pad
        block_experts += [e] * ((len(group) + pad) // block)
        offsets.append(len(sorted_slots))
    # Fixed upper-bound sizes (no host sync on GPU): unused blocks hold sentinels and expert -1.
    max_blocks = -(-(len(flat) + num_experts * (block - 1)) // block)
    sorted_slots += [len(flat)] * (max_blocks * block - len(sorted_slots))
    block_experts += [-1] * (max_blocks - len(block_experts))
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_i32(sorted_slots), as_i32(block_experts), as_i32(offsets)


def moe_combine(expert_out, weights, shared_out=None, shared_gate=None):
    tokens, k = weights.shape
    out = (expert_out.float().reshape(tokens, k, expert_out.shape[-1]) * weights.float()[..., None]).sum(1)
    if shared_out is not None:
        out = out + torch.sigmoid(shared_gate.float().reshape(tokens, 1)) * shared_out.float()
    return out.to(expert_out.dtype)


def int4_weight(qweight, qzeros, scales, g_idx, zero_offset):
    """The [out, in] float32 weight of one GPTQ 4-bit Linear."""
    return dequantize(qweight, qzeros, scales, g_idx, 4, zero_offset, torch.float32)


def gptq_linear(x, qweight, qzeros, scales, g_idx, zero_offset, bias=None):
    y = F.linear(x.float(), int4_weight(qweight, qzeros, scales, g_idx, zero_offset),
                 None if bias is None else bias.float())
    return y.to(x.dtype)


def dense_linear(x, weight, bias=None):
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def decode_attention(query, key, value, mask, scaling):
    """softmax(q k^T * scaling + mask) v for one query position, key/value head h // (H / KVH) per query head,
    -> [batch, 1, heads, head_dim]; a row that may attend to nothing gives zeros."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, 1)
    v = value.float().repeat_interleave(group, 1)
    scores = query.float() @ k.transpose(2, 3) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    nowhere = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(nowhere, 0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype)


def rms_norm(x, weight, eps):
    """The model's RMSNorm: fp32 statistics, normalised x rounded to x's dtype, times weight in x's dtype."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def rope(query, key, cos, sin):
    """x * cos + rotate_half(x) * sin for query and key, in float32, rounded once to their dtype."""
    c, s = cos.float()[:, None], sin.float()[:, None]

    def one(x):
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), -1)
        return (xf * c + rotated * s).to(x.dtype)

    return one(query), one(key)


def _mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate.float())) * F.linear(x, up.float()), down.float())


def moe_ffn(x, topk_ids, topk_weights, w_gate, w_up, w_down, shared_gate=None, shared_up=None, shared_down=None,
            shared_expert_gate=None):
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) + sigmoid(x[t] . g) * shared(x[t]), in float32."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            out[t] += float(topk_weights[t, j]) * _mlp(xf[t:t + 1], w_gate[e], w_up[e], w_down[e])[0]
    if shared_gate is not None:
        scale = torch.sigmoid(xf @ shared_expert_gate.float().reshape(-1, 1))
        out = out + scale * _mlp(xf, shared_gate, shared_up, shared_down)
    return out.to(x.dtype)


def moe_block(x, router_logits, top_k, renormalize, *weights):
    """moe_ffn after the router's softmax / top-k (qwen2_moe_hf.moe.routing.route: weights in the logits' dtype)."""
    topk_weights, topk_ids = route(router_logits, top_k, renormalize)
    return moe_ffn(x, topk_ids, topk_weights, *weights)


def int4_expert_weights(experts, shared, zero_offset):
    """(w_gate, w_up, w_down, shared gate, up, down) as float32 from the int4 ops' flat tensor lists."""
    per = [int4_weight(*experts[i:i + 4], zero_offset) for i in range(0, len(experts), 4)]
    gate, up, down = per[0::3], per[1::3], per[2::3]
    if shared:
        sw = [int4_weight(*shared[i:i + 4], zero_offset) for i in range(0, 12, 4)]
    else:
        sw = [None, None, None]
    return gate, up, down, *sw


def moe_ffn_int4(x, topk_ids, topk_weights, experts, shared, shared_expert_gate, zero_offset):
    gate, up, down, sg, su, sd = int4_expert_weights(experts, shared, zero_offset)
    return moe_ffn(x, topk_ids, topk_weights, gate, up, down, sg, su, sd, shared_expert_gate if shared else None)


# fp32: accumulation order; bf16 / fp16: both sides round the output once (up to one ulp apart: 2^-8, 2^-11).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
