"""Expert dispatch: one entry point for the routed experts, and the small registry of backends behind it.

A backend is a function with the reference's signature:
    fn(hidden_states [T, H], topk_ids [T, k], topk_weights [T, k], experts) -> [T, H]
`auto` takes the first registered backend that is available and supports the inputs; a backend asked for by name
that cannot run raises. Choose per model with `config.moe_backend` (`from_pretrained(..., moe_backend=...)`) or for
the process with env QWEN2_MOE_HF_MOE_BACKEND.
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Tuple

from .reference import experts_forward_reference

logger = logging.getLogger("qwen2_moe_hf")

ENV_BACKEND = "QWEN2_MOE_HF_MOE_BACKEND"


@dataclass
class Backend:
    name: str
    forward: Callable
    # () -> (available, reason when not)
    available: Callable[[], Tuple[bool, str]]
    # (hidden_states, experts) -> (supported, reason when not); checked per call, so keep it cheap
    supports: Callable
    # Tried by `auto` in increasing order.
    priority: int = 100


_BACKENDS = {}
_warned_fallback = set()


def register_backend(backend):
    _BACKENDS[backend.name] = backend


def _always(*_args):
    return True, ""


register_backend(Backend("torch", experts_forward_reference, _always, _always, priority=1000))


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


def select_backend(name, hidden_states, experts):
    """The Backend that runs these inputs. Named backends must run; `auto` falls back, logging once why."""
    if name != "auto":
        backend = _BACKENDS[name]
        for check in (backend.available(), backend.supports(hidden_states, experts)):
            if not check[0]:
                raise RuntimeError(f"moe_backend {name!r} cannot run here: {check[1]}")
        return backend
    for backend in sorted(_BACKENDS.values(), key=lambda b: b.priority):
        ok, why = backend.available()
        if ok:
            ok, why = backend.supports(hidden_states, experts)
        if ok:
            return backend
        key = (backend.name, why)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            logger.info("qwen2_moe_hf: moe backend %r skipped (%s)", backend.name, why)
    raise RuntimeError("no moe backend can run these inputs")  # unreachable: torch always runs


def experts_forward(hidden_states, topk_ids, topk_weights, experts, backend="auto"):
    """The routed experts' weighted output [T, H] through the chosen backend."""
    return select_backend(backend, hidden_states, experts).forward(hidden_states, topk_ids, topk_weights, experts)
