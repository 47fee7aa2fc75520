"""The `torch` backend: the portable reference, simple and exact, and the oracle every other backend is tested
against. One pass per expert that received tokens: gather its tokens, run the expert's own module (so wrappers,
hooks, adapters and autograd all apply), scale by the routing weight and scatter-add back. Any dtype and device."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..weights import ExpertWeights


def experts_forward_reference(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                              experts: Sequence[nn.Module]) -> torch.Tensor:
    """hidden_states [T, H], topk_ids [T, k], topk_weights [T, k] -> the routed experts' weighted sum [T, H]."""
    out = torch.zeros_like(hidden_states)
    # One host sync for the whole layer: which experts got any token.
    hit = torch.bincount(topk_ids.flatten(), minlength=len(experts)).nonzero().flatten().tolist()
    for expert_idx in hit:
        token_idx, slot = torch.where(topk_ids == expert_idx)
        y = experts[expert_idx](hidden_states[token_idx]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def experts_torch(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  weights: ExpertWeights) -> torch.Tensor:
    return experts_forward_reference(hidden_states, top_k_index, top_k_weights, weights.mlps)


def supports(weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return None


def available() -> Tuple[bool, str]:
    return True, ""
