"""The routed experts' prepared weights: one object per MoE layer that every backend reads.

The model keeps the hub's layout (one MLP module per expert, `experts.{e}.{gate,up,down}_proj`), so checkpoints and
state dicts are per expert and PEFT can wrap any projection. A backend wants the layer's weights as lists it can
hand to a kernel at once, and may cache what it builds from them (the CPU op's layer pack, the Triton address
tables). ExpertWeights gathers them once from the modules, with the shared expert's, and holds those caches.

It is rebuilt on one path: `Qwen2MoeExperts.prepared_weights()` returns the cached object while `current()` holds,
else prepares a new one. `current()` is an identity check of everything the object read (each expert's projection
modules and their weight tensors; in C++, kernels' IdentityWatch, ~15 µs for a layer of 60 experts with cold caches,
as in decode; the Python fallback ~80-120 µs), so a replaced module (PEFT wrapping), a replaced tensor
(`module.weight = ...`, `load_state_dict(..., assign=True)`, accelerate's offload hooks, which write `_parameters`
directly) or a replaced expert is seen on the next call. `_apply` (`.to()`, `.half()`, `.cuda()`) and
`load_state_dict` drop the object explicitly. In-place updates (`load_state_dict` without assign, optimiser steps)
keep every tensor and address, and need nothing.

A projection is read as
  dense: a plain `nn.Linear` without bias (its `weight`, [out, in]);
  int4:  an `Int4Projection` (gptq.GPTQLinear implements it) without bias: its GPTQ tensors;
anything else (a wrapper, a bias, a quantization we do not know, a tensor subclass such as a tensor-parallel DTensor)
leaves the layer to the reference backend, which calls the modules themselves. So does a forward (pre-)hook on a
routed expert or one of its projections, since the kernels never call those modules; a hooked shared expert is
left out (its modules compute it beside the kernels). The hook dicts are watched too: a hook registered after
preparing, or the last one removed, is seen on the next call.
"""

import abc
import operator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..kernels.build import loaded_cpu_module

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
INT4_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_get_projections = operator.itemgetter(*PROJECTIONS)
_PLAIN = (torch.Tensor, nn.Parameter)  # what the kernels read: a tensor's own storage


@dataclass(frozen=True)
class Int4Tensors:
    """One Linear stored in the GPTQ 4-bit format: W[n, k] = scales[g, n] * (q[k, n] - (zero[g, n] + zero_offset)),
    g = g_idx[k] (gptq/format.py). qweight is [K/8, N], or on CPU after loading the same words blocked
    [N/64, K/8, 64] (format.block_qweight), which the CPU kernels read either way."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    zero_offset: int

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qweight, self.qzeros, self.scales, self.g_idx


class Int4Projection(abc.ABC):
    """A Linear whose weight is stored as 4-bit GPTQ tensors in its buffers (gptq.GPTQLinear). The backends read it
    through this interface only."""

    @abc.abstractmethod
    def int4_tensors(self) -> Optional[Int4Tensors]:
        """Its 4-bit tensors, or None when they cannot be read as such (another bit width, a bias)."""

    def cpu_linear_args(self, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
        """(qweight, qzeros, scales, g_idx, zero_offset, bias or None) when its forward on x would run the CPU op
        gptq_linear_cpu, so that a caller may run it together with others on the same x (moe/dense.py's
        fused_projections); else None."""
        return None


@dataclass(eq=False)
class ExpertWeights:
    """A MoE layer's routed experts (and its shared expert) as the backends read them.

    kind: "dense" (gate / up / down: one [out, in] weight per expert, one dtype and device), "int4" (one
    Int4Tensors per projection, one zero offset and device) or None (`reason` says why; only the reference
    backend runs it). The shared expert's projections, when it has the routed experts' kind, are in `shared`;
    else it stays full precision and its modules compute it (`shared_module`)."""

    mlps: Tuple[nn.Module, ...]
    shared_module: Optional[nn.Module]
    kind: Optional[str] = None
    reason: str = ""
    gate: List[Any] = field(default_factory=list)
    up: List[Any] = field(default_factory=list)
    down: List[Any] = field(default_factory=list)
    shared: Optional[Tuple[Any, Any, Any]] = None
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None  # dense weights' dtype (int4: None)
    zero_offset: int = 0
    activation: str = "silu"
    # The identity check: watched[i] must still hold, under key watched_keys[i], the object expected[i].
    _dicts: List[dict] = field(default_factory=list, repr=False)
    _keys: List[str] = field(default_factory=list, repr=False)
    _expected: List[Any] = field(default_factory=list, repr=False)
    _watch: Any = field(default=None, repr=False)  # kernels' IdentityWatch over the three lists above
    _caches: Dict[Any, Any] = field(default_factory=dict, repr=False)
    _container: dict = field(default_factory=dict, repr=False)
    _container_size: int = 0
    # The forward (pre-)hook dicts of the modules whose forward the kernels stand in for: those empty when prepared
    # must stay empty (a hook registered since is seen), those that held hooks must keep one (removing the last
    # lets the kernels back in).
    _empty: List[dict] = field(default_factory=list, repr=False)
    _hooked: List[dict] = field(default_factory=list, repr=False)

    @property
    def num_experts(self) -> int:
        return len(self.mlps)

    def current(self) -> bool:
        """Whether every module and tensor this object read is still the one the model holds (an expert added or
        removed shows in the length of the container's dict)."""
        if len(self._container) != self._container_size or self._hooked and not all(self._hooked):
            return False
        watch = self._watch
        if watch is None:
            module = loaded_cpu_module()  # the compiled check, once the CPU ops are loaded (never builds them)
            if module is None:
                return not any(self._empty) and _same_objects(self._dicts, self._keys, self._expected)
            watch = self._watch = module.IdentityWatch(self._dicts, self._keys, self._expected, self._empty)
        return watch.current()

    def watched(self) -> "Watched":
        """What current() checks, for a caller that folds it into its own watch (moe/decode_layer.py)."""
        return Watched(self._dicts, self._keys, self._expected, self._container, self._container_size, self._empty,
                       self._hooked)

    def cached(self, key: Any, build: Callable[[], Any], valid: Optional[Callable[[Any], bool]] = None) -> Any:
        """A backend's cache (the CPU layer pack, Triton tables, the resolved backend), built once per object (and
        again when `valid` says the cached value no longer holds)."""
        value = self._caches.get(key, _MISSING)
        if value is _MISSING or (valid is not None and not valid(value)):
            value = self._caches[key] = build()
        return value

    def projection_tensors(self) -> List[torch.Tensor]:
        """Every tensor the kernels read, routed experts first (gate, up, down of each), then the shared expert's."""
        linears = [p for e in range(len(self.gate)) for p in (self.gate[e], self.up[e], self.down[e])]
        linears += list(self.shared or ())
        return [t for p in linears for t in (p.tensors() if isinstance(p, Int4Tensors) else (p,))]

    # Copies and pickles of a model build their own (the caches hold compiled objects and raw addresses).
    def __deepcopy__(self, memo: Dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> Tuple[type, tuple]:
        return type(None), ()


class Watched(NamedTuple):
    """Every slot an ExpertWeights read (dicts[i][keys[i]] is expected[i]), the experts' container with its
    length, the hook dicts that must stay empty and those that must keep a hook."""
    dicts: List[dict]
    keys: List[str]
    expected: List[Any]
    container: dict
    size: int
    empty: List[dict]
    hooked: List[dict]


_MISSING = object()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def _same_objects(dicts: Sequence[dict], keys: Sequence[str], expected: Sequence[Any]) -> bool:
    # Without the compiled IdentityWatch: C-level iteration, a dict lookup and an identity test per entry.
    return all(map(operator.is_, map(dict.get, dicts, keys), expected))


def _watch(w: ExpertWeights, d: dict, key: str) -> Any:
    value = d.get(key)
    w._dicts.append(d)
    w._keys.append(key)
    w._expected.append(value)
    return value


def prepare(container: nn.Module, shared_module: Optional[nn.Module] = None,
            activation: str = "silu") -> ExpertWeights:
    """Gather the weights of the routed experts (the modules `container` holds, each with gate_proj / up_proj /
    down_proj) and of the shared expert, watching every module and tensor read."""
    modules = container.__dict__["_modules"]
    w = ExpertWeights(mlps=(), shared_module=shared_module, activation=activation)
    mlps = [_watch(w, modules, key) for key in list(modules)]
    w.mlps, w._container, w._container_size = tuple(mlps), modules, len(modules)
    if not mlps:
        w.reason = "no experts"
        return w
    everything = mlps + ([shared_module] if shared_module is not None else [])
    projections = []
    for mlp in everything:
        child = mlp.__dict__.get("_modules", {})
        projections.append([_watch(w, child, name) for name in PROJECTIONS])
    routed, shared = projections[:len(mlps)], projections[len(mlps):]
    # Forward hooks on an expert or its projections: the kernels would not call them, so the modules run.
    names = [f"experts.{key}" for key in modules] + (["shared_expert"] if shared_module is not None else [])
    hooked = [_hooks(w, [(name, mlp)] + [(f"{name}.{p}", m) for p, m in zip(PROJECTIONS, projs)])
              for name, mlp, projs in zip(names, everything, projections)]
    first = next((h for h in hooked[:len(mlps)] if h), None)
    if first is not None:
        w.reason = f"forward hooks on {first}: the experts' modules run"
        return w
    kinds = {_kind(p) for mlp in routed for p in mlp}
    if len(kinds) != 1 or None in kinds:
        w.reason = "expert projections are not all plain bias-free nn.Linear or all 4-bit GPTQ layers (wrapped?)"
        return w
    kind = kinds.pop()
    read = _read_int4 if kind == "int4" else _read_dense
    for mlp in routed:
        g, u, d = (read(w, p) for p in mlp)
        w.gate.append(g)
        w.up.append(u)
        w.down.append(d)
    if shared and all(_kind(p) == kind for p in shared[0]) and not hooked[-1]:  # else its modules compute it
        w.shared = tuple(read(w, p) for p in shared[0])
    tensors = w.projection_tensors()
    if any(type(t) not in _PLAIN for t in tensors):
        # A DTensor (transformers' tensor parallelism shards a weight into one) or another tensor subclass: the
        # kernels would read the local storage (a shard: partial sums) or none at all. Only the modules' own
        # forwards, with whatever hooks sharded them, compute these layers.
        kinds = sorted({type(t).__name__ for t in tensors if type(t) not in _PLAIN})
        w.reason = f"expert weights are tensor subclasses ({', '.join(kinds)}: sharded by tensor parallelism?)"
        return w
    devices = {t.device for t in tensors}
    if kind == "dense":
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or any(t.dim() != 2 for t in tensors):
            w.reason = f"expert weights of several dtypes {sorted(map(str, dtypes))}"
            return w
        w.dtype = dtypes.pop()
    else:
        offsets = {p.zero_offset for p in chain(w.gate, w.up, w.down, w.shared or ())}
        if len(offsets) != 1:
            w.reason = "4-bit experts of two GPTQ formats (zero offsets)"
            return w
        w.zero_offset = offsets.pop()
    if len(devices) != 1:
        w.reason = f"expert weights on several devices {sorted(map(str, devices))}"
        return w
    w.device = devices.pop()
    if w.device.type == "meta":
        w.reason = "expert weights on the meta device (offloaded, or not loaded yet)"
        return w
    w.kind = kind
    return w


def _hooks(w: ExpertWeights, modules: Sequence[Tuple[str, Any]]) -> Optional[str]:
    """Records the modules' forward hook dicts (empty ones to stay empty, others to keep a hook); returns the name
    of the first module with a hook, or None."""
    first = None
    for name, module in modules:
        for attr in _HOOK_DICTS:
            d = module.__dict__.get(attr) if isinstance(module, nn.Module) else None
            if not isinstance(d, dict):
                continue
            if d:
                w._hooked.append(d)
                first = first or name
            else:
                w._empty.append(d)
    return first


def _kind(projection: Optional[nn.Module]) -> Optional[str]:
    if type(projection) is nn.Linear and projection.bias is None:
        return "dense"
    if isinstance(projection, Int4Projection) and projection.int4_tensors() is not None:
        return "int4"
    return None


def _read_dense(w: ExpertWeights, linear: nn.Linear) -> torch.Tensor:
    parameters = linear.__dict__["_parameters"]
    _watch(w, parameters, "bias")  # None: a bias set later must be seen
    return _watch(w, parameters, "weight")


def _read_int4(w: ExpertWeights, layer: Int4Projection) -> Optional[Int4Tensors]:
    buffers = layer.__dict__["_buffers"]
    for part in INT4_PARTS + ("bias",):
        _watch(w, buffers, part)
    return layer.int4_tensors()
