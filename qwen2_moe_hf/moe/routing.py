"""The router: softmax over expert logits in float32, top-k, optional renormalisation (Qwen1.5-MoE: none)."""

import torch


def route(router_logits, top_k, norm_topk_prob):
    """router_logits [T, E] -> (topk_weights [T, k] in the logits' dtype, topk_ids [T, k] int64).

    Softmax runs in float32 whatever the model dtype, as in the released model; ties resolve as torch.topk does.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids
