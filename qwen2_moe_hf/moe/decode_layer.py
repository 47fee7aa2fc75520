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
The caller (the decoder layer) brings the cache's buffers (compat.decode_kv_layer) and commits the new position.

What the pack was built from is watched (an IdentityWatch over every module and tensor slot it read); a replaced
module or tensor rebuilds it. A layer that cannot take the lane keeps a plan that says so, watched the same way.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..kernels.build import cpu_module, load_cpu_ops
from .backends import requested_backend, resolve
from .backends import cpu as cpu_backend
from .dense import _ATTENTION_EXTRAS, DecodeLinear
from .weights import Int4Projection

_DTYPES = (torch.bfloat16, torch.float16)


class DecodeKinds(NamedTuple):
    """The model's module classes the lane stands in for."""
    attention: type
    moe: type
    norm: type


@dataclass(eq=False)
class DecodePlan:
    dtype: torch.dtype
    watch: Any  # IdentityWatch (or None: nothing could be read)
    pack: Any = None  # the extension's DecodeLayerPack; None: this layer does not take the lane
    modules: Tuple[nn.Module, ...] = ()  # whose hooks would run in the modular forward
    scalars: Tuple[Any, ...] = ()  # (eps1, eps2, scaling) as the pack holds them
    attention: Optional[nn.Module] = None
    norms: Tuple[nn.Module, ...] = ()
    block: Optional[nn.Module] = None
    kv_heads: int = 0
    head_dim: int = 0
    lanes: bool = False  # fp16 dense projections: taken only while the lanes kernel is on


class DecodeCall(NamedTuple):
    """One decode step's arguments, but the cache's."""
    plan: DecodePlan
    cos: torch.Tensor
    sin: torch.Tensor
    router: torch.Tensor
    shared_gate: Optional[torch.Tensor]
    moe_pack: Any


def _no_modes() -> bool:
    return (not torch._C._is_torch_function_mode_enabled() and not torch._C._len_torch_dispatch_stack()
            and not torch.compiler.is_compiling())


def _plain(t: Any) -> bool:
    return type(t) is nn.Parameter or type(t) is torch.Tensor


def _build(layer: nn.Module, x: torch.Tensor, kinds: DecodeKinds) -> DecodePlan:
    dicts: List[dict] = []
    keys: List[str] = []
    expected: List[Any] = []

    def read(d: Dict[str, Any], key: str) -> Any:
        value = d.get(key)
        dicts.append(d)
        keys.append(key)
        expected.append(value)
        return value

    def done(**fields: Any) -> DecodePlan:
        return DecodePlan(dtype=x.dtype, watch=cpu_module().IdentityWatch(dicts, keys, expected), **fields)

    mods = layer._modules
    attn, block = read(mods, "self_attn"), read(mods, "mlp")
    ln1, ln2 = read(mods, "input_layernorm"), read(mods, "post_attention_layernorm")
    if (type(attn) is not kinds.attention or type(block) is not kinds.moe or type(ln1) is not kinds.norm
            or type(ln2) is not kinds.norm or getattr(attn, "sliding_window", None) is not None):
        return done()
    projs = [read(attn._modules, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    norm_weights = [read(ln._parameters, "weight") for ln in (ln1, ln2)]
    if not all(_plain(w) and w.is_cpu and w.dtype == x.dtype and w.dim() == 1 for w in norm_weights):
        return done()
    block_mods = [read(block._modules, name) for name in ("gate", "shared_expert_gate", "experts", "shared_expert")]
    heads, kv_heads, head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
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
        o_args = projs[3].cpu_linear_args(x.new_empty(1, heads * head_dim))
        args.append(o_args)
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
    scalars = (float(ln1.variance_epsilon), float(ln2.variance_epsilon), float(attn.scaling))
    pack = cpu_module().DecodeLayerPack(norm_weights[0], scalars[0], norm_weights[1], scalars[1], projections,
                                        biases, int4, zero_offset, heads, kv_heads, head_dim, scalars[2])
    modules = (attn, ln1, ln2, block, *projs, *(m for m in block_mods if isinstance(m, nn.Module)))
    return done(pack=pack, modules=modules, scalars=scalars, attention=attn, norms=(ln1, ln2), block=block,
                kv_heads=kv_heads, head_dim=head_dim, lanes=lanes)


def _hooked(modules: Sequence[nn.Module]) -> bool:
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


def prepare(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
            attention_kwargs: Dict[str, Any], kinds: DecodeKinds) -> Optional[DecodeCall]:
    """The step's arguments when this call of `layer` can take the lane (all but the cache's, which the caller
    checks), else None. The caller has checked that autograd is off and attention weights are not wanted."""
    x = hidden_states
    if (type(x) is not torch.Tensor or not x.is_cpu or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != 1
            or x.dtype not in _DTYPES or layer.training or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks or _torch_module._global_backward_hooks
            or not _no_modes() or not load_cpu_ops()[0]):
        return None
    if attention_kwargs and any(attention_kwargs.get(name) is not None for name in _ATTENTION_EXTRAS):
        return None
    plan = layer.__dict__.get("_decode_plan")
    if plan is None or plan.dtype is not x.dtype or not plan.watch.current():
        plan = layer.__dict__["_decode_plan"] = _build(layer, x, kinds)
    if plan.pack is None:
        return None
    attn, block = plan.attention, plan.block
    ln1, ln2 = plan.norms
    if (attn.training or block.training or attn.sliding_window is not None or _hooked(plan.modules)
            or (ln1.variance_epsilon, ln2.variance_epsilon, attn.scaling) != plan.scalars
            or (getattr(attn.config, "_attn_implementation", None) or "sdpa") != "sdpa"
            or plan.lanes and not cpu_module().dense_row_lanes()):
        return None
    cos, sin = position_embeddings
    if (type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or cos.dtype != x.dtype
            or sin.dtype != x.dtype or not cos.is_cpu or not sin.is_cpu or cos.dim() != 3 or cos.shape[:2] != (1, 1)
            or sin.shape != cos.shape or cos.shape[2] != plan.head_dim):
        return None
    weights = block.experts.prepared_weights(block.shared_expert)
    chosen = resolve(requested_backend(getattr(block.config, "moe_backend", None)), weights, x.device, x.dtype)
    if chosen.fused_layer is not cpu_backend.fused_layer or (
            weights.shared_module is not None and weights.shared is None):  # that one adds its shared expert
        return None
    args = cpu_backend.layer_args(block, x, weights)
    if args is None:
        return None
    return DecodeCall(plan, cos, sin, *args)


def mask_fits(mask: Optional[torch.Tensor], positions: int) -> bool:
    """Whether the decode attention op takes this mask for `positions` keys (as dense.decode_attention asks)."""
    return mask is None or (type(mask) is torch.Tensor and mask.dim() == 4 and mask.shape[2] == 1
                            and mask.shape[-1] == positions)


def run(call: DecodeCall, hidden_states: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, held: int,
        mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the layer's output [1, 1, hidden], router logits [1, experts]); the step's key and value are written at
    position `held` of the cache buffers."""
    block = call.plan.block
    return cpu_module().decode_layer(hidden_states, call.cos, call.sin, key_cache, value_cache, held, mask,
                                     call.plan.pack, call.router, block.top_k, block.norm_topk_prob, call.moe_pack,
                                     call.shared_gate)
