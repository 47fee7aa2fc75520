"""Expert dispatch: one entry point for the routed experts, and the small registry of backends behind it.

A backend is a function with the reference's signature:
    fn(hidden_states [T, H], topk_ids [T, k], topk_weights [T, k], experts, shared_expert, shared_expert_gate)
        -> [T, H] = routed experts' weighted sum + sigmoid(shared_expert_gate(x)) * shared_expert(x)
`auto` takes the first registered backend that is available and supports the inputs; a backend asked for by name
that cannot run raises. Choose per model with `config.moe_backend` (`from_pretrained(..., moe_backend=...)`) or for
the process with env QWEN2_MOE_HF_MOE_BACKEND.
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from . import cpu, cuda_backend, routing, triton_backend
from .reference import moe_forward_reference

logger = logging.getLogger("qwen2_moe_hf")

ENV_BACKEND = "QWEN2_MOE_HF_MOE_BACKEND"


@dataclass
class Backend:
    name: str
    forward: Callable
    # () -> (available, reason when not)
    available: Callable[[], Tuple[bool, str]]
    # (hidden_states, experts, shared_expert) -> (supported, reason when not); checked per call, so keep it cheap
    supports: Callable
    # Tried by `auto` in increasing order.
    priority: int = 100
    # Without a backward, calls that need gradients run on the torch reference instead (training keeps working).
    has_backward: bool = False
    # (router_logits, top_k, norm_topk_prob) -> (topk_weights, topk_ids); None: moe.routing.route
    route: Optional[Callable] = None
    # (hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert, shared_expert_gate) -> [T, H]:
    # routes as moe.routing.route does and runs the experts in one call; None: route, then forward.
    forward_logits: Optional[Callable] = None


_BACKENDS = {}
_warned_fallback = set()
_GPU_ONLY = ("triton", "cuda")  # built-in backends that never take CPU tensors
# Derived from _BACKENDS by register_backend, its only writer: the backends by priority, and whether `auto` gives
# CPU inputs to the cpu backend whenever it supports them (only GPU-only built-ins come before it; a backend
# registered ahead of it takes that lane away).
_ordered = []
_cpu_leads = False


def register_backend(backend):
    global _cpu_leads
    _BACKENDS[backend.name] = backend
    _ordered[:] = sorted(_BACKENDS.values(), key=lambda b: b.priority)
    names = [b.name for b in _ordered]
    _cpu_leads = "cpu" in names and all(name in _GPU_ONLY for name in names[:names.index("cpu")])


def _always(*_args):
    return True, ""


register_backend(Backend("torch", moe_forward_reference, _always, _always, priority=1000, has_backward=True))
register_backend(Backend("cpu", cpu.moe_forward_cpu, cpu.available, cpu.supports, priority=50,
                         forward_logits=cpu.moe_block_forward_cpu))
register_backend(Backend("triton", triton_backend.moe_forward_triton, triton_backend.available,
                         triton_backend.supports, priority=20))
register_backend(Backend("cuda", cuda_backend.moe_forward_cuda, cuda_backend.available, cuda_backend.supports,
                         priority=30, route=cuda_backend.route_cuda))


def available_backends():
    return sorted(_BACKENDS)


def env_report():
    """{backend name: "available" or why not}: what this machine can run."""
    report = {}
    for name in sorted(_BACKENDS, key=lambda n: _BACKENDS[n].priority):
        ok, why = _BACKENDS[name].available()
        report[name] = "available" if ok else f"unavailable: {why}"
    return report


def requested_backend(config_value=None):
    """The backend name in force: the model's config, else the environment, else auto."""
    name = config_value or os.environ.get(ENV_BACKEND) or "auto"
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"moe_backend: unknown backend {name!r}; known: auto, {', '.join(available_backends())}")
    return name


def _needs_grad(hidden_states, modules):
    if not torch.is_grad_enabled():
        return False
    return hidden_states.requires_grad or any(p.requires_grad for m in modules if m is not None for p in m.parameters())


def _log_once(backend, why):
    if (backend, why) not in _warned_fallback:
        _warned_fallback.add((backend, why))
        logger.info("qwen2_moe_hf: moe backend %r skipped (%s)", backend, why)


def select_backend(name, hidden_states, experts, shared_expert=None):
    """The Backend that runs these inputs. Named backends must run; `auto` falls back, logging once why.
    Either way, a call that needs gradients goes to a backend with a backward (the torch reference)."""
    if _needs_grad(hidden_states, (experts, shared_expert)) and not (
        name != "auto" and _BACKENDS[name].has_backward
    ):
        if name != "auto":
            _log_once(name, "autograd needs a backward; using the torch reference for this call")
        return _BACKENDS["torch"]
    if name != "auto":
        backend = _BACKENDS[name]
        ok, why = backend.available()
        if ok:
            ok, why = backend.supports(hidden_states, experts, shared_expert)
        if not ok:
            raise RuntimeError(f"moe_backend {name!r} cannot run here: {why}")
        return backend
    for backend in _ordered:
        ok, why = backend.available()
        if ok:
            ok, why = backend.supports(hidden_states, experts, shared_expert)
        if ok:
            return backend
        _log_once(backend.name, why)
    raise RuntimeError("no moe backend can run these inputs")  # unreachable: torch always runs


def sparse_moe_block_forward(block, hidden_states, backend="auto"):
    """A whole Qwen2MoeSparseMoeBlock (router `gate`, `experts`, `shared_expert`, `shared_expert_gate`, `top_k`,
    `norm_topk_prob`) on one backend: hidden_states [..., H] -> (out [..., H], router_logits [tokens, E])."""
    # The fast lane: the cpu backend's whole-layer call (router included), when these inputs would go to it. It
    # answers None for anything it does not take, and the general way below decides.
    if not torch.is_grad_enabled() and (backend == "cpu" or backend == "auto" and _cpu_leads):
        result = cpu.moe_layer_forward_cpu(block, hidden_states)
        if result is not None:
            return result
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    chosen = select_backend(backend, x, block.experts, block.shared_expert)
    router_logits = block.gate(x)
    out = _run(chosen, x, router_logits, block.top_k, block.norm_topk_prob, block.experts, block.shared_expert,
               block.shared_expert_gate)
    return out.reshape(hidden_states.shape), router_logits


def moe_block_forward(hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert=None,
                      shared_expert_gate=None, backend="auto"):
    """The MoE layer after its router: route (top-k of the softmax) and run the experts, on one backend.
    hidden_states [T, H], router_logits [T, E] -> [T, H]."""
    chosen = select_backend(backend, hidden_states, experts, shared_expert)
    return _run(chosen, hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert,
                shared_expert_gate)


def _run(chosen, hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert, shared_expert_gate):
    if chosen.forward_logits is not None:
        return chosen.forward_logits(hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert,
                                     shared_expert_gate)
    topk_weights, topk_ids = (chosen.route or routing.route)(router_logits, top_k, norm_topk_prob)
    return chosen.forward(hidden_states, topk_ids, topk_weights, experts, shared_expert, shared_expert_gate)


def moe_forward(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None,
                backend="auto"):
    """The MoE feed-forward [T, H] (routed experts, weighted, plus the gated shared expert) through a backend."""
    chosen = select_backend(backend, hidden_states, experts, shared_expert)
    return chosen.forward(hidden_states, topk_ids, topk_weights, experts, shared_expert, shared_expert_gate)
