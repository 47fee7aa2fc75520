"""The router's top-k: the one definition every backend uses and every routing kernel matches.

    route(router_logits [T, E], top_k, norm_topk_prob) -> (weights [T, top_k] in the logits' dtype, ids [T, top_k])

Softmax over the experts in float32 (whatever the model dtype, as in the released model); experts ranked by
probability, largest first; equal probabilities rank the lower expert id first; NaN ranks above every number (as
torch.sort orders it: a token with a NaN logit has an all-NaN softmax, so its experts are 0..top_k-1 and its
weights NaN); with norm_topk_prob the top_k weights are renormalised to sum to 1 (Qwen1.5-MoE: not). The weights
are rounded once, at the end, to the logits' dtype.

The kernels that route (csrc/cpu/routing.h: the topk_softmax op and the cpu backend's fused layer;
csrc/cuda/moe_ops.cu: topk_softmax) follow the same order; test_routing.py holds them to it.
"""

from typing import Tuple

import torch


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    # A stable sort, descending: equal probabilities keep the id order (lower first); torch.topk promises no order.
    topk_weights, topk_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    topk_weights, topk_ids = topk_weights[..., :top_k].contiguous(), topk_ids[..., :top_k].contiguous()
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids
