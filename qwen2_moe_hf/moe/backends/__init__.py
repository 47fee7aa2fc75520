"""The built-in MoE backends, registered by name (registry.py has the contract)."""

from . import cpu, reference, triton
from .registry import (
    ENV_BACKEND,
    Backend,
    available_backends,
    backend,
    env_report,
    register_backend,
    registry_version,
    requested_backend,
    resolve,
    select,
    unregister_backend,
)

register_backend(Backend("torch", reference.experts_torch, reference.supports, reference.available, priority=1000,
                         differentiable=True))
register_backend(Backend("cpu", cpu.experts_cpu, cpu.supports, cpu.available, priority=50,
                         fused_layer=cpu.fused_layer))
register_backend(Backend("triton", triton.experts_triton, triton.supports, triton.available, priority=20))

__all__ = ["ENV_BACKEND", "Backend", "available_backends", "backend", "env_report", "register_backend",
           "registry_version", "requested_backend", "resolve", "select", "unregister_backend"]
