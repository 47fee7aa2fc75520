"""The dense pieces of a decode step around the MoE blocks, on the CPU ops where a step's few rows make torch's
general kernels slow (measured in docs/benchmarks.md), and torch's own code everywhere else:

- DecodeLinear: the attention projections and lm_head through the CPU ops' streaming GEMV;
- decode_attention: attention for one query position (`decode_attention_cpu`), in place of
  scaled_dot_product_attention's flash kernel (7-9x slower for one query here);
- rms_norm: RMSNorm in one op (`rms_norm_cpu`) with the model's roundings, in place of eight eager ops;
- rope: RoPE on query and key in one op (`rope_cpu`), bit for bit the eager code's sixteen ops;
- fused_projections: several GPTQ 4-bit Linears on the same x (q, k, v) in one op (`gptq_linears_cpu`).
"""

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..kernels.build import cpu_module, load_cpu_ops
from .weights import Int4Projection

# Rows of x up to which DecodeLinear streams its bf16 weight itself (the CPU ops' kStreamRows).
DECODE_ROWS = 4


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, state dict and hooks) whose CPU calls on a decode step's few rows go to the CPU
    ops' streaming GEMV (`dense_linear_cpu`) where it is the faster: bf16 up to DECODE_ROWS rows (oneDNN's bf16 GEMV
    reads the weight at 13-19 GB/s where ours reads it at 28-32; lm_head: 32.7 -> 22.2 ms per token), and one fp16
    row (a GPTQ checkpoint's lm_head in its default dtype) where the AVX-512 lanes kernel is built (torch's own fp16
    GEMV is close behind it, 14.9 against 12.0 ms for lm_head, and ahead of the AVX2 kernels; docs/CHANGELOG.md,
    measurement log). Same math: fp32 sums, the output rounded once. Anything else (more rows, other dtypes or
    devices, gradients, torch.compile, distributed weights) is nn.Linear's own forward. Used for the attention
    projections and lm_head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.is_cpu and w.dtype == x.dtype and type(w) in (nn.Parameter, torch.Tensor) and x.dim() >= 1
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling() and load_cpu_ops()[0]
                and (x.dtype == torch.bfloat16 and x.numel() <= DECODE_ROWS * x.shape[-1]
                     or x.dtype == torch.float16 and x.numel() == x.shape[-1] and x.shape[-1] % 32 == 0
                     and cpu_module().dense_row_lanes())):
            y = torch.ops.qwen2_moe_hf.dense_linear_cpu(x.reshape(-1, x.shape[-1]), w, self.bias)
            return y.view(*x.shape[:-1], w.shape[0])
        return super().forward(x)


# Keyword arguments of an attention call that change what it computes (softcapping, a position bias, a paged cache):
# calls carrying any of them keep the registry's function.
_ATTENTION_EXTRAS = ("softcap", "position_bias", "cache", "s_aux", "sinks")


def _no_grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                     sliding_window: Optional[int] = None, **kwargs: Any) -> Optional[torch.Tensor]:
    """softmax(q k^T * scaling + mask) v -> [batch, 1, heads, head_dim] for a decode step on CPU (one query
    position; q [b, heads, 1, d], k/v [b, kv_heads, kv, d] in q's dtype; mask None, boolean or additive and
    broadcastable to [b, heads, 1, kv]), or None where the op does not apply and the caller's attention function
    must run: more query positions, other devices, tensor subclasses, dropout, gradients, torch.compile, a sliding
    window the mask does not already hold, or keyword arguments that change the computation."""
    if (not query.is_cpu or query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4
            or not all(type(t) is torch.Tensor for t in (query, key, value))  # subclasses (DTensor) dispatch themselves
            or key.dtype != query.dtype or value.dtype != query.dtype
            or query.dtype not in (torch.bfloat16, torch.float16, torch.float32) or dropout
            or kwargs and any(kwargs.get(name) is not None for name in _ATTENTION_EXTRAS)
            or not _no_grad_needed(query, key, value) or torch.compiler.is_compiling()):
        return None
    if attention_mask is not None:
        if not mask_fits(attention_mask, key.shape[2]):
            return None
    elif sliding_window is not None and key.shape[2] > sliding_window:
        return None
    if not load_cpu_ops()[0]:
        return None
    return torch.ops.qwen2_moe_hf.decode_attention_cpu(query, key, value, attention_mask, float(scaling))


def mask_fits(mask: Optional[torch.Tensor], positions: int) -> bool:
    """Whether decode_attention_cpu takes this mask for one query over `positions` keys: none, or a 4-D tensor
    [.., .., 1, positions] (the op checks the rest and broadcasts batch and heads)."""
    return mask is None or (type(mask) is torch.Tensor and mask.dim() == 4 and mask.shape[2] == 1
                            and mask.shape[-1] == positions)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """weight * normalise(x) as the model computes it (fp32 statistics, rounded to x's dtype, scaled by weight in
    x's dtype) in one CPU op, or None where it does not apply (other devices or dtypes, gradients, compile, a
    weight of another dtype or a subclassed one)."""
    if (not rms_norm_takes(x, weight) or not _no_grad_needed(x, weight) or torch.compiler.is_compiling()
            or not load_cpu_ops()[0]):
        return None
    return torch.ops.qwen2_moe_hf.rms_norm_cpu(x, weight, float(eps))


def rms_norm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the CPU rms_norm op takes these tensors as the module holds them (devices, dtypes, shapes, a plain
    weight). One predicate for rms_norm and the decode lane's final norm, which must agree."""
    return (x.is_cpu and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == x.dtype
            and weight.is_cpu and type(weight) in (nn.Parameter, torch.Tensor) and weight.dim() == 1
            and x.dim() != 0 and x.shape[-1] == weight.shape[0])


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(q * cos + rotate_half(q) * sin, the same for k) in one CPU op with the eager code's roundings (q, k
    [batch, heads, length, head_dim]; cos, sin [batch or 1, length, head_dim]), or None where it does not apply and
    the eager code must run: other devices or dtypes, tensor subclasses, shapes it does not take (the eager code
    then broadcasts or raises as before), gradients, compile."""
    tensors = (query, key, cos, sin)
    if (not query.is_cpu or query.dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or not all(type(t) is torch.Tensor and t.dtype == query.dtype and t.is_cpu
                       for t in tensors)
            or query.dim() != 4 or key.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape
            or query.shape[-1] % 2 or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]
            or cos.shape[0] not in (1, query.shape[0]) or cos.shape[1:] != query.shape[2:]
            or not _no_grad_needed(*tensors) or torch.compiler.is_compiling() or not load_cpu_ops()[0]):
        return None
    return torch.ops.qwen2_moe_hf.rope_cpu(query, key, cos, sin)


def fused_projections(x: torch.Tensor, modules: Sequence[nn.Module]) -> Optional[List[torch.Tensor]]:
    """[module(x) for module in modules] in one CPU op call when every module is a GPTQ 4-bit Linear (an
    `Int4Projection`) whose own forward would take the CPU op on x, without hooks, all of one zero offset; else
    None, and the caller runs the modules. Same kernels, same results bit for bit; one call instead of three per
    attention layer, and for a decode row one parallel region over the three weights."""
    if (len(modules) < 2 or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or torch.compiler.is_compiling()):
        return None
    args = []
    for m in modules:
        if not isinstance(m, Int4Projection) or m._forward_hooks or m._forward_pre_hooks:
            return None
        a = m.cpu_linear_args(x)
        if a is None or (args and a[4] != args[0][4]):
            return None
        args.append(a)
    lead = x.shape[:-1]
    outs = torch.ops.qwen2_moe_hf.gptq_linears_cpu.default(
        x.reshape(-1, x.shape[-1]), [t for a in args for t in a[:4]], [a[5] for a in args], int(args[0][4]))
    return [o.view(*lead, o.shape[-1]) for o in outs]
