"""The MoE backends: plain functions in a name -> Backend registry, resolved once per (layer, device, dtype).

A backend computes a layer's routed experts from the router's top-k, with the reference's signature:

    experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], weights: ExpertWeights) -> [T, H]
        = sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])

and says whether it can run a layer (`supports`, from its prepared weights, the inputs' device and dtype) and
whether it can run at all here (`available`). A backend may also declare a fused lane, `fused_layer(block, x,
weights) -> (out, router_logits) or None`: the router, routing, routed and shared experts in one call (the cpu
backend's C++ layer). It is a capability like any other field, used for inference (no autograd) when the backend
resolved for the layer has it.

Which backend runs: the model's `config.moe_backend`, else env QWEN2_MOE_HF_MOE_BACKEND, else "auto" (the first
available backend, by priority, that supports the layer; the reference always does). A backend named explicitly
must run, or the call raises. A call that needs gradients runs on a differentiable backend (the reference).
The choice is cached in the layer's prepared weights (moe/weights.py), so it is made again only when they change.
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..weights import ExpertWeights

logger = logging.getLogger("qwen2_moe_hf")

ENV_BACKEND = "QWEN2_MOE_HF_MOE_BACKEND"

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertWeights], torch.Tensor]
SupportsFn = Callable[[ExpertWeights, torch.device, torch.dtype], Optional[str]]
AvailableFn = Callable[[], Tuple[bool, str]]
FusedLayerFn = Callable[[nn.Module, torch.Tensor, ExpertWeights], Optional[Tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Backend:
    name: str
    experts: ExpertsFn
    # (weights, device, dtype) -> None when it runs this layer, else why not. Called once per resolution.
    supports: SupportsFn
    # () -> (available, why not)
    available: AvailableFn
    # `auto` tries backends in increasing priority.
    priority: int = 100
    # Whether autograd can go through it (else calls that need gradients run on the reference).
    differentiable: bool = False
    # The fused lane: router + routing + routed and shared experts in one call, or None when it declines the call.
    fused_layer: Optional[FusedLayerFn] = None


# Names that were backends once, with what to use instead.
REMOVED: Dict[str, str] = {
    "cuda": "the 'cuda' backend was removed (it looped over the experts in Python with a host sync per layer); "
            "use 'triton' (dense and int4 experts on a GPU) or 'auto'",
}

_BACKENDS: Dict[str, Backend] = {}
_ordered: List[Backend] = []  # by priority, derived by register_backend / unregister_backend
_version = [0]  # bumped by every change to the registry: layers resolved before it resolve again
_logged = set()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _changed()


def unregister_backend(name: str) -> None:
    if name == "torch":
        raise ValueError("the torch backend (the reference) cannot be removed: it runs what no other backend does")
    del _BACKENDS[name]
    _changed()


def registry_version() -> int:
    """Bumped by every change to the registry: what was resolved before it must resolve again."""
    return _version[0]


def _changed() -> None:
    _ordered[:] = sorted(_BACKENDS.values(), key=lambda b: b.priority)
    _version[0] += 1


def backend(name: str) -> Backend:
    return _BACKENDS[name]


def available_backends() -> List[str]:
    return sorted(_BACKENDS)


def env_report() -> Dict[str, str]:
    """{backend name: "available" or why not}: what this machine can run, by priority."""
    report = {}
    for b in _ordered:
        ok, why = b.available()
        report[b.name] = "available" if ok else f"unavailable: {why}"
    return report


def requested_backend(config_value: Optional[str] = None) -> str:
    """The backend name in force: the model's config, else the environment, else auto."""
    name = config_value or os.environ.get(ENV_BACKEND) or "auto"
    if name in REMOVED and name not in _BACKENDS:
        raise ValueError(f"moe_backend: {REMOVED[name]}")
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"moe_backend: unknown backend {name!r}; known: auto, {', '.join(available_backends())}")
    return name


def _log_once(name: str, why: str) -> None:
    if (name, why) not in _logged:
        _logged.add((name, why))
        logger.info("qwen2_moe_hf: moe backend %r skipped (%s)", name, why)


def _resolve(name: str, weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Backend:
    candidates = _ordered if name == "auto" else [_BACKENDS[name]]
    for b in candidates:
        ok, why = b.available()
        why = None if ok else why
        if why is None:
            why = b.supports(weights, device, dtype)
        if why is None:
            return b
        if name != "auto":
            raise RuntimeError(f"moe_backend {name!r} cannot run here: {why}")
        _log_once(b.name, why)
    raise RuntimeError("no moe backend can run these inputs")  # unreachable: the reference runs anything


def resolve(name: str, weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend for this layer on this device and dtype, resolved once and kept in its prepared weights."""
    return weights.cached(("backend", name, device, dtype, _version[0]),
                          lambda: _resolve(name, weights, device, dtype))


def needs_grad(hidden_states: torch.Tensor, weights: ExpertWeights) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden_states.requires_grad or any(p.requires_grad for mlp in weights.mlps for p in mlp.parameters())


def select(name: str, weights: ExpertWeights, hidden_states: torch.Tensor) -> Backend:
    """The backend that runs this call: the resolved one, or the reference when autograd needs a backward or global
    module hooks are registered (they see every module a forward calls, and the kernels call none of the experts')."""
    chosen = resolve(name, weights, hidden_states.device, hidden_states.dtype)
    if chosen.name == "torch":
        return chosen
    if not chosen.differentiable and needs_grad(hidden_states, weights):
        if name != "auto":
            _log_once(name, "autograd needs a backward; using the reference for this call")
        return _BACKENDS["torch"]
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        if name != "auto":
            _log_once(name, "global module hooks are registered; using the reference for this call")
        return _BACKENDS["torch"]
    return chosen
