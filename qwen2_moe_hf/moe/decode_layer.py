"""A decoder layer's decode step (one sequence, one new position) in one call to the CPU extension's decode_layer.

Why: a decode step of the real model spends ~0.25-0.45 ms per layer outside its kernels (docs/benchmarks.md):
a dozen op calls from Python (norms, projections, RoPE, the cache, attention, the MoE block), each with its checks
and, with caches cold after gigabytes of weights, its slow start. The extension's decode_layer runs the same
functions the modules reach through the ops, in the same order, so the result is theirs bit for bit; the modules
are not called, so the lane is taken only where calling them would have taken exactly those ops:

- the layer's modules are the model's own classes (`DecodeKinds`), without hooks, in eval mode, full attention;
- q/k/v/o are DecodeLinears whose forward takes `dense_linear_cpu` (bf16; fp16 with the lanes kernel), or 4-bit
  projections whose forward takes `gptq_linear_cpu`, of one zero offset;
- the norms' weights have the activations' dtype; the MoE block takes the cpu backend's fused lane;
- the call: a [1, 1, hidden] CPU tensor, no autograd, torch.compile or function / dispatch modes, sdpa attention
  without extra keyword arguments, cos / sin of one position, and a mask the decode attention op takes.
The caller (the decoder layer) brings its cache layer (compat.decode_kv_layer); run_steps writes the new position
into its buffers and commits it. Where every layer of the model takes the lane, Qwen2MoeModel hands all their steps
to run_steps at once: one call to the extension for the whole step, with each layer's Python run back to back
rather than between the layers' weight streams, where it ran with caches cold (~0.2 ms a layer at the real shape).

Everything a layer's plan was built from is watched by one IdentityWatch, checked once per call: every module and
tensor slot it read (the experts' too), the scalar attributes it holds (training, eps, scaling, top_k, ...) as slots
of their modules' __dict__, and the hook dicts of every module the modular forward would call, which must stay
empty. A replaced module or tensor, a changed attribute or a new hook rebuilds the plan; `_apply` (.to(), .half())
and load_state_dict drop it (Qwen2MoeDecoderLayer). A layer that cannot take the lane keeps a plan that says so,
watched the same way. With caches cold, as they are in decode, this one check costs a fraction of the Python
checks it replaces (~100-130 us per layer for those at the real shape).
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..kernels.build import cpu_module, load_cpu_ops
from .backends import ENV_BACKEND, registry_version, requested_backend, resolve
from .backends import cpu as cpu_backend
from .dense import _ATTENTION_EXTRAS, DecodeLinear, rms_norm_takes
from .weights import Int4Projection

_DTYPES = (torch.bfloat16, torch.float16)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class DecodeKinds(NamedTuple):
    """The model's module classes the lane stands in for."""
    attention: type
    moe: type
    norm: type


@dataclass(eq=False)
class DecodePlan:
    """What a layer's decode steps need beyond the step's own tensors, and how to tell it still holds."""
    dtype: torch.dtype
    watch: Any  # IdentityWatch over every slot read, and the hook dicts that must stay empty
    container: dict  # the experts' module dict, and its length when the plan was built
    size: int = 0
    pack: Any = None  # the extension's DecodeLayerPack; None: this layer does not take the lane
    env: Optional[str] = None  # the backend environment variable, and the registry's version, when built
    registry: int = -1
    router: Optional[torch.Tensor] = None
    shared_gate: Optional[torch.Tensor] = None
    moe_pack: Any = None
    top_k: int = 0
    renormalize: bool = False
    kv_heads: int = 0
    head_dim: int = 0
    lanes: bool = False  # fp16 dense projections: taken only while the lanes kernel is on
    hooked: Tuple[dict, ...] = ()  # a plan without the lane for hooks: their dicts (it holds while any has one)
    int4_probe: Optional[nn.Module] = None  # 4-bit projections: asked per call whether they still take their op

    def current(self, x: torch.Tensor) -> bool:
        return (self.dtype is x.dtype and len(self.container) == self.size and self.watch.current()
                and self.registry == registry_version() and self.env == os.environ.get(ENV_BACKEND)
                and (not self.hooked or any(self.hooked)))

    # Copies and pickles of a model build their own (the plan holds compiled objects).
    def __deepcopy__(self, memo: Dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> Tuple[type, tuple]:
        return type(None), ()


class DecodeCall(NamedTuple):
    """One decode step's arguments, but the cache's."""
    plan: DecodePlan
    cos: torch.Tensor
    sin: torch.Tensor


def _plain(t: Any) -> bool:
    return type(t) is nn.Parameter or type(t) is torch.Tensor


def _build(layer: nn.Module, x: torch.Tensor, kinds: DecodeKinds) -> DecodePlan:
    dicts: List[dict] = []
    keys: List[str] = []
    expected: List[Any] = []
    empty: List[dict] = []
    container: Dict[str, Any] = {}
    size = 0

    def read(d: Dict[str, Any], key: str) -> Any:
        value = d.get(key)
        dicts.append(d)
        keys.append(key)
        expected.append(value)
        return value

    def attrs(module: nn.Module, *names: str) -> List[Any]:
        return [read(module.__dict__, name) for name in names]

    def done(**fields: Any) -> DecodePlan:
        watch = cpu_module().IdentityWatch(dicts, keys, expected, empty)
        return DecodePlan(dtype=x.dtype, watch=watch, container=container, size=size,
                          env=os.environ.get(ENV_BACKEND), registry=registry_version(), **fields)

    mods = layer._modules
    attn, block = read(mods, "self_attn"), read(mods, "mlp")
    ln1, ln2 = read(mods, "input_layernorm"), read(mods, "post_attention_layernorm")
    if (type(attn) is not kinds.attention or type(block) is not kinds.moe or type(ln1) is not kinds.norm
            or type(ln2) is not kinds.norm):
        return done()
    layer_training = read(layer.__dict__, "training")
    attn_training, window, scaling, config = attrs(attn, "training", "sliding_window", "scaling", "config")
    eps1, eps2 = attrs(ln1, "variance_epsilon")[0], attrs(ln2, "variance_epsilon")[0]
    top_k, renormalize, block_config = attrs(block, "top_k", "norm_topk_prob", "config")
    if layer_training or attn_training or window is not None:
        return done()
    # The attention implementation, a watched slot: transformers 5.x's _attn_implementation property reads
    # _attn_implementation_internal from the config's __dict__ (a config keeping it elsewhere: no lane).
    if "_attn_implementation_internal" not in getattr(config, "__dict__", {}):
        return done()
    read(config.__dict__, "_attn_implementation_internal")
    if (getattr(config, "_attn_implementation", None) or "sdpa") != "sdpa":
        return done()
    projs = [read(attn._modules, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    norm_weights = [read(ln._parameters, "weight") for ln in (ln1, ln2)]
    if not all(_plain(w) and w.is_cpu and w.dtype == x.dtype and w.dim() == 1 for w in norm_weights):
        return done()
    heads, kv_heads, head_dim = attrs(attn, "num_heads", "num_key_value_heads", "head_dim")
    lanes = False
    if all(type(p) is DecodeLinear for p in projs):
        weights = [read(p._parameters, "weight") for p in projs]
        biases = [read(p._parameters, "bias") for p in projs]
        if not all(_plain(t) and t.is_cpu and t.dtype == x.dtype and t.dim() == 2 for t in weights):
            return done()
        if x.dtype == torch.float16:  # DecodeLinear's fp16 condition: one row on the lanes kernel
            if any(w.shape[1] % 32 for w in weights):
                return done()
            lanes = True
        projections, zero_offset, int4 = weights, 0, False
    elif all(isinstance(p, Int4Projection) for p in projs):
        args = [p.cpu_linear_args(x) for p in projs[:3]]
        args.append(projs[3].cpu_linear_args(x.new_empty(1, heads * head_dim)))
        if any(a is None for a in args) or len({a[4] for a in args}) != 1:
            return done()
        for p, a in zip(projs, args):  # watch the buffers the arguments came from
            for t in (*a[:4], a[5]):
                if t is None:
                    continue
                name = next((k for k, v in p._buffers.items() if v is t), None)
                if name is None:
                    return done()
                read(p._buffers, name)
        projections = [t for a in args for t in a[:4]]
        biases = [a[5] for a in args]
        zero_offset, int4 = int(args[0][4]), True
    else:
        return done()
    # The MoE block: the cpu backend's fused lane, as the block's forward would resolve it now.
    experts, shared = read(block._modules, "experts"), read(block._modules, "shared_expert")
    gate, shared_expert_gate = read(block._modules, "gate"), read(block._modules, "shared_expert_gate")
    read(block_config.__dict__, "moe_backend")
    weights = experts.prepared_weights(shared)
    # What the experts' weights were read from, hooks included, so that a plan with or without the lane holds
    # exactly as long as they do.
    watched = weights.watched()
    dicts += watched.dicts
    keys += watched.keys
    expected += watched.expected
    empty += watched.empty
    container, size = watched.container, watched.size
    chosen = resolve(requested_backend(getattr(block_config, "moe_backend", None)), weights, x.device, x.dtype)
    if chosen.fused_layer is not cpu_backend.fused_layer or (
            weights.shared_module is not None and weights.shared is None):  # that one adds its shared expert
        return done(hooked=tuple(watched.hooked))
    called = [attn, ln1, ln2, block, *projs, gate, experts, shared, shared_expert_gate]
    hooks = [getattr(m, h) for m in called if isinstance(m, nn.Module) for h in _HOOKS]
    if any(hooks):  # the modules run, with their hooks, until the last one is removed
        return done(hooked=tuple(hooks))
    for linear in (gate, shared_expert_gate):
        if isinstance(linear, nn.Module):
            read(linear._parameters, "weight")
    moe = cpu_backend.layer_args(block, x, weights)
    if moe is None:
        return done()
    empty += hooks
    pack = cpu_module().DecodeLayerPack(norm_weights[0], float(eps1), norm_weights[1], float(eps2), projections,
                                        biases, int4, zero_offset, heads, kv_heads, head_dim, float(scaling))
    return done(pack=pack, router=moe[0], shared_gate=moe[1], moe_pack=moe[2], top_k=int(top_k),
                renormalize=bool(renormalize), kv_heads=kv_heads, head_dim=head_dim,
                lanes=lanes, int4_probe=projs[0] if int4 else None)


def calls_forward(module: nn.Module, cls: type) -> bool:
    """Whether calling `module` runs exactly cls.forward on it: of class cls, its forward not replaced, no hooks of
    its own (global hooks keep every lane off: prepare)."""
    return type(module) is cls and "forward" not in module.__dict__ and not any(getattr(module, h) for h in _HOOKS)


def drop(layer: nn.Module) -> None:
    """Forget the layer's plan (its tensors may have been converted in place: .to(), .half(), load_state_dict)."""
    layer.__dict__.pop("_decode_plan", None)


def prepare(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
            attention_kwargs: Dict[str, Any], kinds: DecodeKinds) -> Optional[DecodeCall]:
    """The step's arguments when this call of `layer` can take the lane (all but the cache's, which the caller
    checks), else None. The caller has checked that autograd is off and attention weights are not wanted."""
    x = hidden_states
    if (type(x) is not torch.Tensor or not x.is_cpu or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != 1
            or x.dtype not in _DTYPES or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks or _torch_module._global_backward_hooks
            or not cpu_backend.no_modes() or not load_cpu_ops()[0]):
        return None
    if attention_kwargs and any(attention_kwargs.get(name) is not None for name in _ATTENTION_EXTRAS):
        return None
    plan = layer.__dict__.get("_decode_plan")
    if plan is None or not plan.current(x):
        plan = layer.__dict__["_decode_plan"] = _build(layer, x, kinds)
    if (plan.pack is None or plan.lanes and not cpu_module().dense_row_lanes()
            or plan.int4_probe is not None and plan.int4_probe.cpu_linear_args(x) is None):
        return None
    cos, sin = position_embeddings
    if (type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or cos.dtype != x.dtype
            or sin.dtype != x.dtype or not cos.is_cpu or not sin.is_cpu or cos.dim() != 3 or cos.shape[:2] != (1, 1)
            or sin.shape != cos.shape or cos.shape[2] != plan.head_dim):
        return None
    return DecodeCall(plan, cos, sin)


class DecodeStep:
    """One layer's decode step as run_steps takes it: the call's arguments, the cache layer it appends to (an
    AppendingLayer: compat.decode_kv_layer) and its mask; router_logits is set by run_steps."""
    __slots__ = ("call", "cache", "mask", "router_logits")

    def __init__(self, call: DecodeCall, cache: Any, mask: Optional[torch.Tensor]) -> None:
        self.call, self.cache, self.mask, self.router_logits = call, cache, mask, None


def final_norm(norm: nn.Module, cls: type, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, float]]:
    """(weight, eps) where calling `norm` on x (the last layer's output of a decode step) runs exactly the CPU
    rms_norm op on them (cls.forward through moe.dense.rms_norm), so run_steps may apply it; else None."""
    weight = norm._parameters.get("weight") if calls_forward(norm, cls) else None
    if weight is None or not rms_norm_takes(x, weight):
        return None
    return weight, float(norm.variance_epsilon)


def run_steps(steps: List[DecodeStep], hidden_states: torch.Tensor,
              norm: Optional[Tuple[torch.Tensor, float]] = None) -> torch.Tensor:
    """The layers' steps in order, each on the previous one's output, in one call to the extension's decode_layers
    (one layer: the model's per-layer path; all of them: Qwen2MoeModel._decode_layers). Each step's key and value go
    into its cache layer's buffers, then every cache layer commits its new position; if the call raises, none
    does, and the caches hold what they held. Returns the last layer's output, normed by `norm` (final_norm's)
    when given; each step's router_logits is set."""
    args, held = [], []
    for step in steps:
        p = step.call.plan
        shape = (1, p.kv_heads, 1, p.head_dim)
        key_cache, value_cache, n = step.cache.reserve(shape, shape, hidden_states.dtype, hidden_states.device)
        held.append(n)
        args.append((key_cache, value_cache, n, step.mask, step.call.cos, step.call.sin, p.pack, p.router,
                     p.top_k, p.renormalize, p.moe_pack, p.shared_gate))
    out, logits, keys, values = cpu_module().decode_layers(hidden_states, args, *(norm or (None, 0.0)))
    for step, n, step_logits, k, v in zip(steps, held, logits, keys, values):
        step.cache.commit(n + 1, k, v)
        step.router_logits = step_logits
    return out
