"""The portable torch reference for the routed experts: simple, exact, and the oracle every other backend is
tested against. One pass per expert that received tokens: gather its tokens, SiLU(x Wg^T) * (x Wu^T), then Wd,
scale by the routing weight and scatter-add back."""

import torch


def experts_forward_reference(hidden_states, topk_ids, topk_weights, experts):
    """hidden_states [T, H], topk_ids [T, k], topk_weights [T, k] -> routed-expert output [T, H].

    `experts` is a sequence of modules with gate_proj / up_proj / down_proj and act_fn (the hub's per-expert layout).
    Works with autograd, any dtype and device.
    """
    out = torch.zeros_like(hidden_states)
    num_experts = len(experts)
    # One host sync for the whole layer: which experts got any token.
    hit = torch.bincount(topk_ids.flatten(), minlength=num_experts).nonzero().flatten().tolist()
    for expert_idx in hit:
        token_idx, slot = torch.where(topk_ids == expert_idx)
        expert = experts[expert_idx]
        x = hidden_states[token_idx]
        y = expert.down_proj(expert.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def moe_forward_reference(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    """Routed experts plus, when given, the shared expert scaled by sigmoid(shared_expert_gate(x))."""
    out = experts_forward_reference(hidden_states, topk_ids, topk_weights, experts)
    if shared_expert is not None:
        out = out + torch.sigmoid(shared_expert_gate(hidden_states)) * shared_expert(hidden_states)
    return out
