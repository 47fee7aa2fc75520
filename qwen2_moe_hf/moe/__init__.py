"""The MoE layer's machinery below the modeling file: the router's top-k (routing.py), the experts' prepared
weights (weights.py), the backends that compute the routed experts (backends/), and the dense layers around them
on the same CPU ops (dense.py)."""

from .backends import (
    Backend,
    available_backends,
    env_report,
    register_backend,
    requested_backend,
    resolve,
    select,
    unregister_backend,
)
from .backends.reference import experts_forward_reference
from .dense import DecodeLinear, decode_attention, fused_projections, rms_norm, rope
from .routing import route
from .weights import ExpertWeights, Int4Projection, Int4Tensors, prepare

__all__ = [
    "Backend",
    "DecodeLinear",
    "ExpertWeights",
    "Int4Projection",
    "Int4Tensors",
    "available_backends",
    "decode_attention",
    "env_report",
    "experts_forward_reference",
    "fused_projections",
    "prepare",
    "register_backend",
    "requested_backend",
    "resolve",
    "rms_norm",
    "rope",
    "route",
    "select",
    "unregister_backend",
]
