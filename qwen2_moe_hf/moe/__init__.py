"""The MoE layer's machinery: routing, the expert-dispatch entry point and its backends."""

from .dispatch import (
    Backend,
    env_report,
    moe_block_forward,
    moe_forward,
    register_backend,
    requested_backend,
    select_backend,
    sparse_moe_block_forward,
)
from .reference import experts_forward_reference, moe_forward_reference
from .routing import route

__all__ = [
    "Backend",
    "env_report",
    "experts_forward_reference",
    "moe_block_forward",
    "moe_forward",
    "moe_forward_reference",
    "register_backend",
    "requested_backend",
    "route",
    "select_backend",
    "sparse_moe_block_forward",
]
