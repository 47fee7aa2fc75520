"""The `cpu` backend: the MoE layer in C++ (csrc/cpu/moe_ffn_cpu.cpp), reading each expert's weights once in their
storage dtype (bf16 / fp16 / fp32, or GPTQ 4-bit experts from gptq.linear.GPTQLinear). Three entries:
- moe_layer_forward_cpu: the whole layer, router included, in one call to the extension (the layer lane, tried
  first by dispatch.sparse_moe_block_forward);
- moe_block_forward_cpu: from the router's logits (softmax / top-k done in the op);
- moe_forward_cpu: from given top-k ids and weights (the ops moe_ffn_cpu / moe_ffn_int4_cpu).

Per call, the op needs the ~180 weight tensors the model holds now. Reading them from the modules costs ~0.3 ms per
layer when caches are cold (as they are after a decode step's weights streamed through), 5% of the layer's time;
so each layer's view of its weights is built once and kept while the dicts they come from are unchanged.
`_WatchedDict` replaces those dicts (the experts' `_modules`, the projections' `_parameters` / `_buffers`) and
counts every change made through them, which is how torch (`module.weight = ...`, `register_*`, `.to()`),
accelerate (writes `_parameters[name]` directly) and PEFT (swaps modules) change a model.
"""

import torch
from torch.nn.modules import module as _torch_module

from .extension import cpu_module, load_cpu_ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PROJ = ("gate_proj", "up_proj", "down_proj")
_INT4_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_VIEW = "_qmoe_cpu_view"
_CELL = "_qmoe_cpu_changes"  # on the experts module: [changes to the dicts its layer's view reads]


def available():
    return load_cpu_ops()


class _WatchedDict(dict):
    """A module's `_modules` / `_parameters` / `_buffers` dict that counts its changes in the change cell (a
    one-element list) of each layer whose view reads it, so a change invalidates those layers' views and no other
    (accelerate's offload rewrites the offloaded layers' weights on every forward; the resident layers keep theirs).
    Reads are plain dict reads. Pickles and copies as a plain dict (the copy's views watch it again)."""

    __slots__ = ("_cells",)

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self._cells = []

    def _changed(self):
        for cell in self._cells:
            cell[0] += 1

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        self._changed()

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        self._changed()

    def __ior__(self, other):
        dict.update(self, other)
        self._changed()
        return self

    def _changing(method):  # noqa: N805  (wraps dict's other mutating methods)
        def wrapped(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                self._changed()

        wrapped.__name__ = method.__name__
        return wrapped

    pop, popitem, clear, update, setdefault = map(_changing, (dict.pop, dict.popitem, dict.clear, dict.update,
                                                              dict.setdefault))
    del _changing

    def __reduce__(self):
        return dict, (dict(self),)


def _watch(module, names, cell):
    for name in names:
        d = module.__dict__.get(name)
        if d is None:
            continue
        if type(d) is not _WatchedDict:
            d = module.__dict__[name] = _WatchedDict(d)
        if not any(c is cell for c in d._cells):  # a module in several layers counts for each
            d._cells.append(cell)


class _LayerView:
    """One MoE layer's expert weights as the op reads them, checked once; valid while the layer's change cell (kept
    on the experts module, shared by its successive views) is what it was at the build.
    kind: "dense" (tensors: gate, up, down per expert, then the shared expert's), "int4" (tensors: the 12 GPTQ
    tensors per expert, then the shared expert's 12 or none; zero_offset) or None (the op cannot read them)."""

    def __init__(self, experts, shared_expert):
        self.experts, self.shared_expert = experts, shared_expert
        self.kind, self.tensors, self.shared_tensors, self.zero_offset, self.pack = None, [], [], 0, None
        self.module = None  # the CPU extension, once the pack is built
        mlps = list(experts._modules.values())
        config = getattr(mlps[0], "config", None) if mlps else None
        # The activation is fixed when the MLPs are built (act_fn = ACT2FN[config.hidden_act]): checked here once.
        self.activation = getattr(config, "hidden_act", "silu")
        if shared_expert is not None:
            mlps.append(shared_expert)
        self.cell = cell = experts.__dict__.setdefault(_CELL, [0])
        _watch(experts, ("_modules",), cell)
        for mlp in mlps:
            _watch(mlp, ("_modules",), cell)
        projs = [mlp._modules.get(name) for mlp in mlps for name in _PROJ]
        if any(p is None for p in projs):  # not gate/up/down MLPs
            self.changes = cell[0]
            return
        for proj in projs:
            _watch(proj, ("_parameters", "_buffers"), cell)
        self.changes = cell[0]  # after installing the watches: installing them is not a change
        if self.activation in ("silu", "swish") and available()[0]:  # the pack is a class of the CPU extension
            self._check_int4(experts, mlps, projs) or self._check_dense(projs)

    def _check_dense(self, projs):
        if any(p._parameters.get("bias") is not None for p in projs):
            return False
        weights = [p._parameters.get("weight") for p in projs]
        if not all(isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2
                   and w.dtype == weights[0].dtype for w in weights) or weights[0].dtype not in _DTYPES:
            return False
        self.kind, self.tensors = "dense", weights
        self.module = cpu_module()
        self.pack = self.module.LayerPack(weights, len(self.experts), False, 0)
        return True

    def _check_int4(self, experts, mlps, projs):
        from ..gptq.linear import GPTQLinear

        def int4(layer):
            return isinstance(layer, GPTQLinear) and layer.bits == 4 and layer.bias is None

        routed = projs[:3 * len(experts)]
        if not all(map(int4, routed)):
            return False
        shared = projs[3 * len(experts):]
        shared_int4 = bool(shared) and all(map(int4, shared))
        layers = routed + shared if shared_int4 else routed
        tensors = [layer._buffers[part] for layer in layers for part in _INT4_PARTS]
        offsets = {layer.zero_offset for layer in layers}
        if len(offsets) != 1 or not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
            return False
        split = 12 * len(experts)
        self.kind, self.tensors, self.shared_tensors = "int4", tensors[:split], tensors[split:]
        self.zero_offset = offsets.pop()
        self.module = cpu_module()
        self.pack = self.module.LayerPack(tensors, len(experts), True, self.zero_offset)
        return True

    def __reduce__(self):  # copies and pickles of the model build their own views
        return type(None), ()


def _view(experts, shared_expert):
    view = experts.__dict__.get(_VIEW)
    if (view is None or view.changes != view.cell[0] or view.experts is not experts
            or view.shared_expert is not shared_expert):
        view = _LayerView(experts, shared_expert)
        experts.__dict__[_VIEW] = view
    return view


def supports(hidden_states, experts, shared_expert=None):
    if hidden_states.device.type != "cpu":
        return False, f"inputs on {hidden_states.device}, not cpu"
    if hidden_states.dtype not in _DTYPES:
        return False, f"dtype {hidden_states.dtype} (cpu backend: float32, bfloat16, float16)"
    view = _view(experts, shared_expert)
    if view.activation not in ("silu", "swish"):
        return False, f"activation {view.activation} (cpu backend: silu)"
    if view.kind is None:
        return False, "expert weights are neither plain contiguous CPU tensors of one dtype nor GPTQ 4-bit (offloaded?)"
    return True, ""


def _dense_args(view, experts, shared_expert_gate):
    w, n = view.tensors, 3 * len(experts)
    shared = (*w[n:], shared_expert_gate.weight) if len(w) > n else (None, None, None, None)
    return (w[0:n:3], w[1:n:3], w[2:n:3], *shared)


def moe_forward_cpu(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    view = _view(experts, shared_expert)  # supports() built it; this only re-reads it
    if view.kind == "int4":
        gate = shared_expert_gate.weight if view.shared_tensors else None
        out = torch.ops.qwen2_moe_hf.moe_ffn_int4_cpu(hidden_states, topk_ids, topk_weights, view.tensors,
                                                      view.shared_tensors, gate, view.zero_offset)
        return _add_full_precision_shared(out, view, hidden_states, shared_expert, shared_expert_gate)
    return torch.ops.qwen2_moe_hf.moe_ffn_cpu(hidden_states, topk_ids, topk_weights,
                                              *_dense_args(view, experts, shared_expert_gate))


def moe_block_forward_cpu(hidden_states, router_logits, top_k, norm_topk_prob, experts, shared_expert=None,
                          shared_expert_gate=None):
    """Routing (as moe.routing.route computes it) and the layer in one op call."""
    view = _view(experts, shared_expert)
    if _direct(hidden_states, router_logits):
        gate = shared_expert_gate.weight if shared_expert_gate is not None else None
        out = cpu_module().moe_block(hidden_states, router_logits, top_k, norm_topk_prob, view.pack, gate)
    elif view.kind == "int4":
        gate = shared_expert_gate.weight if view.shared_tensors else None
        out = torch.ops.qwen2_moe_hf.moe_block_int4_cpu(hidden_states, router_logits, top_k, norm_topk_prob,
                                                        view.tensors, view.shared_tensors, gate, view.zero_offset)
    else:
        out = torch.ops.qwen2_moe_hf.moe_block_cpu(hidden_states, router_logits, top_k, norm_topk_prob,
                                                   *_dense_args(view, experts, shared_expert_gate))
    if view.kind == "int4":
        out = _add_full_precision_shared(out, view, hidden_states, shared_expert, shared_expert_gate)
    return out


def moe_layer_forward_cpu(block, hidden_states):
    """The whole layer, router included, in one call: (out, router_logits), or None when this backend does not take
    it so (the caller then goes the general way: select a backend, run the router as a module). It takes plain CPU
    tensors of a supported dtype, with gradients off, a router that is a plain bias-free Linear in the inputs'
    dtype without hooks (not quantized, wrapped or watched), experts the op reads, and no compile tracing or
    function / dispatch mode active. Decode runs this once per layer per token with caches cold, where each Python
    call costs microseconds: hence one flat function."""
    modules = block._modules
    gate, experts, shared = modules.get("gate"), modules.get("experts"), modules.get("shared_expert")
    view = experts.__dict__.get(_VIEW) if experts is not None else None
    if view is None or view.changes != view.cell[0] or view.experts is not experts or view.shared_expert is not shared:
        if experts is None or not available()[0]:
            return None
        view = _view(experts, shared)
    if view.pack is None or type(gate) is not torch.nn.Linear or gate._forward_hooks or gate._forward_pre_hooks:
        return None
    weight = gate._parameters.get("weight")
    if (weight is None or gate._parameters.get("bias") is not None or type(hidden_states) is not torch.Tensor
            or type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor
            or not hidden_states.is_cpu or not weight.is_cpu or hidden_states.dtype is not weight.dtype or weight.dtype not in _DTYPES
            or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks or not _no_modes()):
        return None
    shared_expert_gate, shared_gate = modules.get("shared_expert_gate"), None
    if shared is not None:
        if type(shared_expert_gate) is not torch.nn.Linear:
            return None
        shared_gate = shared_expert_gate._parameters.get("weight")
    out, logits = view.module.moe_layer(hidden_states, weight, block.top_k, block.norm_topk_prob, view.pack,
                                        shared_gate)
    if view.kind == "int4":
        out = _add_full_precision_shared(out, view, hidden_states, shared, shared_expert_gate)
    return out, logits


def _no_modes():
    return (not torch._C._is_torch_function_mode_enabled() and not torch._C._len_torch_dispatch_stack()
            and not torch.compiler.is_compiling())


def _direct(*tensors):
    """Whether the extension's functions may be called directly, outside the dispatcher: plain tensors, and no
    torch.compile tracing, TorchFunctionMode or TorchDispatchMode (fake tensors, flop counters) to see the call."""
    return all(type(t) is torch.Tensor for t in tensors) and _no_modes()


def _add_full_precision_shared(out, view, hidden_states, shared_expert, shared_expert_gate):
    if shared_expert is not None and not view.shared_tensors:  # a full-precision shared expert beside int4 experts
        out = out + torch.sigmoid(shared_expert_gate(hidden_states)) * shared_expert(hidden_states)
    return out
