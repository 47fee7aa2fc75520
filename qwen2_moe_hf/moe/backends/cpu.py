"""The `cpu` backend: the MoE layer in C++ (kernels/csrc/cpu/moe_ffn_cpu.cpp), reading each expert's weights once
in their storage dtype (bf16 / fp16 / fp32, or GPTQ 4-bit) and widening them on the way.

- experts: the routed experts from the router's top-k, through the registered ops moe_ffn_cpu / moe_ffn_int4_cpu
  (traceable by torch.compile: their fakes are in kernels/ops.py).
- fused_layer: the whole layer, router, routing (as route() defines it), routed and shared experts, in one call to
  the extension's moe_layer with the weights as a LayerPack built once per prepared weights. Decode runs it once per
  layer per token with caches cold, where every Python call costs microseconds, so it takes plain CPU tensors
  outside autograd, torch.compile and function / dispatch modes, with a router that is a plain bias-free Linear
  without hooks and no hooks on the modules it stands in for (the experts' container, the shared expert's gate; the
  experts' and the shared expert's own are ExpertWeights'); anything else declines (None) and the block goes the
  general way.
"""

from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ...kernels.build import cpu_module, load_cpu_ops
from ..weights import ExpertWeights

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> Tuple[bool, str]:
    return load_cpu_ops()


def supports(weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"inputs on {device}, not cpu"
    if dtype not in _DTYPES:
        return f"dtype {dtype} (cpu backend: float32, bfloat16, float16)"
    if weights.kind is None:
        return weights.reason
    if weights.device.type != "cpu":
        return f"expert weights on {weights.device}, not cpu"
    if weights.activation not in ("silu", "swish"):
        return f"activation {weights.activation} (cpu backend: silu)"
    if not all(t.is_contiguous() for t in weights.projection_tensors()):
        return "expert weights are not contiguous (the op would copy them on every call)"
    return None


def _routed_args(weights: ExpertWeights) -> Tuple:
    """The ops' weight arguments for the routed experts, built once per prepared weights."""
    if weights.kind == "int4":
        flat = [t for linears in zip(weights.gate, weights.up, weights.down) for p in linears for t in p.tensors()]
        return flat, [], None, weights.zero_offset
    return list(weights.gate), list(weights.up), list(weights.down), None, None, None, None


def experts_cpu(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                weights: ExpertWeights) -> torch.Tensor:
    args = weights.cached("cpu.args", lambda: _routed_args(weights))
    if weights.kind == "int4":
        return torch.ops.qwen2_moe_hf.moe_ffn_int4_cpu(hidden_states, top_k_index, top_k_weights, *args)
    return torch.ops.qwen2_moe_hf.moe_ffn_cpu(hidden_states, top_k_index, top_k_weights, *args)


def _pack(weights: ExpertWeights) -> Any:
    """The extension's LayerPack: every routed expert's tensors, then the shared expert's when it has the experts'
    kind (a full-precision shared expert beside 4-bit experts is added by its modules)."""
    tensors: List[torch.Tensor] = weights.projection_tensors()
    return cpu_module().LayerPack(tensors, weights.num_experts, weights.kind == "int4", weights.zero_offset)


def no_modes() -> bool:
    """Outside torch.compile and function / dispatch modes (which must see every op the model calls)."""
    return (not torch._C._is_torch_function_mode_enabled() and not torch._C._len_torch_dispatch_stack()
            and not torch.compiler.is_compiling())


def layer_args(block: nn.Module, hidden_states: torch.Tensor,
               weights: ExpertWeights) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], Any]]:
    """(router weight, shared expert gate weight or None, LayerPack): the extension's arguments for this block on
    these hidden states, or None when the call must go the general way (the caller checked that autograd is off).
    The gate weight is None when the shared expert is not in the pack (none, or full precision beside 4-bit
    experts, or hooked: its modules compute it)."""
    modules = block._modules
    gate = modules.get("gate")
    if type(gate) is not nn.Linear or gate._forward_hooks or gate._forward_pre_hooks:
        return None
    weight = gate._parameters.get("weight")
    if (weight is None or gate._parameters.get("bias") is not None or type(hidden_states) is not torch.Tensor
            or type(weight) is not nn.Parameter and type(weight) is not torch.Tensor or not weight.is_cpu
            or weight.dtype is not hidden_states.dtype or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks or not no_modes()):
        return None
    experts = modules.get("experts")
    if experts is None or experts._forward_hooks or experts._forward_pre_hooks:  # the call would skip them
        return None
    shared_gate = None
    if weights.shared_module is not None:
        shared_gate_module = modules.get("shared_expert_gate")
        if type(shared_gate_module) is not nn.Linear:
            return None
        if weights.shared is not None and (shared_gate_module._forward_hooks
                                           or shared_gate_module._forward_pre_hooks):
            return None  # the pack would compute the gate without calling it
        shared_gate = shared_gate_module._parameters.get("weight")
    pack = weights.cached("cpu.pack", lambda: _pack(weights))
    return weight, shared_gate if weights.shared is not None else None, pack


def fused_layer(block: nn.Module, hidden_states: torch.Tensor,
                weights: ExpertWeights) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(out [T, H] with the shared expert, router logits [T, E]) in one call, or None when this call must go the
    general way (the caller checked that autograd is off)."""
    args = layer_args(block, hidden_states, weights)
    if args is None:
        return None
    router, shared_gate, pack = args
    out, logits = cpu_module().moe_layer(hidden_states, router, block.top_k, block.norm_topk_prob, pack, shared_gate)
    shared = weights.shared_module
    if shared is not None and weights.shared is None:  # a full-precision shared expert beside 4-bit experts
        out = out + torch.sigmoid(block.shared_expert_gate(hidden_states)) * shared(hidden_states)
    return out, logits
