"""The `cpu` backend: the whole MoE feed-forward (routed experts + gated shared expert) in one C++ op
(csrc/cpu/moe_ffn_cpu.cpp) that reads each expert's weights once in their storage dtype."""

import torch

from .extension import load_cpu_ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available():
    return load_cpu_ops()


def supports(hidden_states, experts, shared_expert=None):
    if hidden_states.device.type != "cpu":
        return False, f"inputs on {hidden_states.device}, not cpu"
    if hidden_states.dtype not in _DTYPES:
        return False, f"dtype {hidden_states.dtype} (cpu backend: float32, bfloat16, float16)"
    if _weight_lists(experts, shared_expert) is None:
        return False, "expert weights are not plain contiguous CPU tensors of one dtype (quantized or offloaded?)"
    config = getattr(experts[0], "config", None)
    if config is not None and config.hidden_act not in ("silu", "swish"):
        return False, f"activation {config.hidden_act} (cpu backend: silu)"
    return True, ""


def _linear_weight(module):
    """The weight of a bias-free nn.Linear-like module, straight from its dicts (this runs per call)."""
    if module._parameters.get("bias") is not None:
        return None
    return module._parameters.get("weight")


def _current(experts, shared_expert):
    mlps = list(experts) if shared_expert is None else [*experts, shared_expert]
    return [_linear_weight(m._modules[name]) for m in mlps for name in ("gate_proj", "up_proj", "down_proj")]


def _weight_lists(experts, shared_expert):
    """The per-expert weight tensors the op reads, as the model holds them (no copies); None if it cannot read them.
    Checked once and cached on the experts module; each call only re-checks that the same tensors are in place."""
    weights = _current(experts, shared_expert)
    cached = experts.__dict__.get("_qmoe_cpu_weights")
    if cached is not None and len(cached) == len(weights) and all(a is b for a, b in zip(cached, weights)):
        first = weights[0]
        if first.device.type == "cpu" and first.dtype in _DTYPES and all(w.dtype == first.dtype for w in weights[::3]):
            return weights
    ok = all(
        isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2
        and w.dtype == weights[0].dtype for w in weights
    ) and weights[0].dtype in _DTYPES
    if not ok:
        experts.__dict__.pop("_qmoe_cpu_weights", None)
        return None
    experts.__dict__["_qmoe_cpu_weights"] = weights
    return weights


def moe_forward_cpu(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    weights = experts.__dict__["_qmoe_cpu_weights"]  # set by supports(), which dispatch always runs first
    gate, up, down = weights[0:3 * len(experts):3], weights[1:3 * len(experts):3], weights[2:3 * len(experts):3]
    shared = (None, None, None, None)
    if shared_expert is not None:
        shared = (*weights[3 * len(experts):], shared_expert_gate.weight)
    return torch.ops.qwen2_moe_hf.moe_ffn_cpu(hidden_states, topk_ids, topk_weights, gate, up, down, *shared)
