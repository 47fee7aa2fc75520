"""The `cuda` backend: the compiled expert-dispatch ops (csrc/cuda: fused router top-k softmax, align, combine)
around cuBLAS GEMMs per expert. Routing and combine never leave the GPU; the per-expert GEMM loop needs the group
bounds on the host (one sync per layer). The Triton backend is the sync-free path for the GEMMs."""

import functools

import torch
import torch.nn.functional as F

from .extension import load_cuda_ops


@functools.lru_cache(maxsize=None)
def available():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return load_cuda_ops()


def supports(hidden_states, experts, shared_expert=None):
    if hidden_states.device.type != "cuda":
        return False, f"inputs on {hidden_states.device}, not cuda"
    expert = experts[0]
    if not all(isinstance(getattr(expert, n), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False, "experts are not plain linear layers (quantized?)"
    return True, ""


def route_cuda(router_logits, top_k, norm_topk_prob):
    weights, ids = torch.ops.qwen2_moe_hf.topk_softmax(router_logits, top_k, norm_topk_prob)
    return weights.to(router_logits.dtype), ids


def moe_forward_cuda(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    tokens, k = topk_ids.shape
    sorted_slots, _, offsets = torch.ops.qwen2_moe_hf.moe_align(topk_ids, len(experts), 1)
    bounds = offsets.tolist()
    slots = sorted_slots[: bounds[-1]].long()
    gathered = hidden_states[slots // k]
    per_slot = hidden_states.new_empty(tokens * k, hidden_states.shape[1])
    for e, expert in enumerate(experts):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        h = gathered[start:end]
        per_slot[slots[start:end]] = expert.down_proj(F.silu(expert.gate_proj(h)) * expert.up_proj(h))
    shared = gate = None
    if shared_expert is not None:
        shared, gate = shared_expert(hidden_states), shared_expert_gate(hidden_states)
    return torch.ops.qwen2_moe_hf.moe_combine(per_slot, topk_weights, shared, gate)
