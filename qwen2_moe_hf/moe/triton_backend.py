"""The `triton` backend (GPU): routed experts through the Triton kernels in triton_kernels.py (or, for GPTQ 4-bit
experts, gptq/triton_int4.py), the shared expert through its own modules. Kernels are imported on first use, so the package works without triton installed."""

import functools
import importlib.util

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def available():
    if importlib.util.find_spec("triton") is None:  # not imported here: importing fixes its interpreter mode
        return False, "triton is not installed (pip install qwen2_moe_hf[triton])"
    if not torch.cuda.is_available():
        return False, "no CUDA device (the Triton kernels are tested on CPU under TRITON_INTERPRET=1)"
    return True, ""


def _weights(experts):
    gate, up, down = [], [], []
    for expert in experts:
        for name, out in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            module = expert._modules[name]
            weight = module._parameters.get("weight")
            if weight is None or module._parameters.get("bias") is not None or not weight.is_contiguous():
                return None
            out.append(weight)
    return gate, up, down


def _int4_weights(experts):
    """GPTQ 4-bit experts (gptq.linear.GPTQLinear, no bias): per projection, a list of (qweight, qzeros, scales,
    g_idx) per expert, and the format's zero offset; None otherwise."""
    lists, offsets = ([], [], []), set()
    for expert in experts:
        for name, out in zip(("gate_proj", "up_proj", "down_proj"), lists):
            module = expert._modules[name]
            if getattr(module, "bits", None) != 4 or module.bias is not None:
                return None
            offsets.add(module.zero_offset)
            out.append(module.tensors())
    return (*lists, offsets.pop()) if len(offsets) == 1 else None


def supports(hidden_states, experts, shared_expert=None):
    if hidden_states.device.type != "cuda":
        return False, f"inputs on {hidden_states.device}, not cuda"
    if hidden_states.dtype not in _DTYPES:
        return False, f"dtype {hidden_states.dtype}"
    int4 = _int4_weights(experts)
    if int4 is not None:
        ok = all(t.device == hidden_states.device for group in int4[:3] for ts in group for t in ts)
        return (True, "") if ok else (False, "int4 expert tensors are not on the inputs' device")
    weights = _weights(experts)
    if weights is None or any(w.device != hidden_states.device or w.dtype != hidden_states.dtype
                              for group in weights for w in group):
        return False, "expert weights are not contiguous tensors on the inputs' device and dtype"
    return True, ""


def moe_forward_triton(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    int4 = _int4_weights(experts)
    if int4 is not None:
        from ..gptq.triton_int4 import routed_experts_int4

        out = routed_experts_int4(hidden_states, topk_ids, topk_weights, *int4[:3], zero_offset=int4[3])
    else:
        from . import triton_kernels

        gate, up, down = _weights(experts)
        out = triton_kernels.routed_experts(hidden_states, topk_ids, topk_weights, gate, up, down)
    if shared_expert is not None:
        out = out + torch.sigmoid(shared_expert_gate(hidden_states)) * shared_expert(hidden_states)
    return out
