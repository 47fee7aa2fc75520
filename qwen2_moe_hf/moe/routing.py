"""The router's top-k: the one definition every backend uses and every routing kernel matches.

    route(router_logits [T, E], top_k, norm_topk_prob) -> (weights [T, top_k] in the logits' dtype, ids [T, top_k])

Softmax over the experts in float32 (whatever the model dtype, as in the released model). Experts are ranked by
their float32 logit, largest first: the order of the exact probabilities, which rounding can make equal (a token
whose logits differ by less than an ulp of the probabilities) where the logits still differ, so every
implementation, whatever its exp, ranks alike. Equal logits rank the lower expert id first. A NaN probability ranks
above every number (a token with a NaN logit has an all-NaN softmax, so its experts are 0..top_k-1 and its weights
NaN; an infinite logit's probability is NaN too). The weights are the top_k probabilities, with norm_topk_prob
renormalised to sum to 1 (Qwen1.5-MoE: not), rounded once, at the end, to the logits' dtype.

The kernels that route (csrc/cpu/routing.h: the topk_softmax op and the cpu backend's fused layer;
csrc/cuda/moe_ops.cu: topk_softmax) follow the same order; test_routing.py holds them to it. On a GPU, route()
itself runs as the CUDA topk_softmax op when the extension is built (one kernel instead of softmax, sort and
gather), for calls that need no gradient; it falls back to the torch ops below otherwise.
"""

from typing import Tuple

import torch


def _op_routes(router_logits: torch.Tensor) -> bool:
    """Whether the compiled topk_softmax op computes this call: a CUDA kernel registered for the logits' device,
    and no gradient to carry (the op has no backward)."""
    return (router_logits.is_cuda and router_logits.dim() == 2
            and not (torch.is_grad_enabled() and router_logits.requires_grad)
            and torch._C._dispatch_has_kernel_for_dispatch_key("qwen2_moe_hf::topk_softmax", "CUDA"))


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if _op_routes(router_logits):
        weights, ids = torch.ops.qwen2_moe_hf.topk_softmax(router_logits, top_k, norm_topk_prob)
        return weights.to(router_logits.dtype), ids
    return route_torch(router_logits, top_k, norm_topk_prob)


def route_torch(router_logits: torch.Tensor, top_k: int,
                norm_topk_prob: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """route() in torch ops: any device, differentiable."""
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    # Rank by logit (NaN probabilities first); a stable sort keeps equal keys in id order: torch.topk promises none.
    key = logits.masked_fill(probs.isnan(), float("inf"))
    topk_ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_k].contiguous()
    topk_weights = probs.gather(-1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids
