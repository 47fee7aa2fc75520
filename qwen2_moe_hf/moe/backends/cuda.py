"""The `cuda` backend: the compiled expert-dispatch ops (kernels/csrc/cuda: align, combine) around one cuBLAS GEMM
per expert with tokens. Routing and combine never leave the GPU; the per-expert loop needs the group bounds on the
host (one sync per layer). The Triton backend is the sync-free path for the GEMMs. Dense experts only."""

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ...kernels.build import load_cuda_ops
from ..weights import ExpertWeights


@functools.lru_cache(maxsize=None)
def available() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return load_cuda_ops()


def supports(weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"inputs on {device}, not cuda"
    if weights.kind != "dense":
        return weights.reason or "4-bit experts (cuda backend: dense only)"
    if weights.device != device or weights.dtype != dtype:
        return f"expert weights in {weights.dtype} on {weights.device}, inputs in {dtype} on {device}"
    return None


def experts_cuda(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 weights: ExpertWeights) -> torch.Tensor:
    tokens, k = top_k_index.shape
    sorted_slots, _, offsets = torch.ops.qwen2_moe_hf.moe_align(top_k_index, weights.num_experts, 1)
    bounds = offsets.tolist()
    if bounds[-1] != tokens * k:  # the CUDA moe_align leaves out-of-range ids out; the reference raises on them
        raise RuntimeError(f"experts_cuda: {tokens * k - bounds[-1]} expert ids out of range [0, "
                           f"{weights.num_experts})")
    slots = sorted_slots[: bounds[-1]].long()
    gathered = hidden_states[slots // k]
    per_slot = hidden_states.new_zeros(tokens * k, hidden_states.shape[1])
    for e in range(weights.num_experts):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        h = gathered[start:end]
        act = F.silu(F.linear(h, weights.gate[e])) * F.linear(h, weights.up[e])
        per_slot[slots[start:end]] = F.linear(act, weights.down[e])
    return torch.ops.qwen2_moe_hf.moe_combine(per_slot, top_k_weights, None, None)
