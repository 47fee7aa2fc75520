"""The `cpu` backend: the whole MoE feed-forward (routed experts + gated shared expert) in one C++ op
(csrc/cpu/moe_ffn_cpu.cpp) that reads each expert's weights once in their storage dtype: bf16 / fp16 / fp32
weights through moe_ffn_cpu, GPTQ 4-bit experts (gptq.linear.GPTQLinear) through moe_ffn_int4_cpu."""

import itertools
import operator

import torch

from .extension import load_cpu_ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PROJ = ("gate_proj", "up_proj", "down_proj")
_INT4_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def available():
    return load_cpu_ops()


def supports(hidden_states, experts, shared_expert=None):
    if hidden_states.device.type != "cpu":
        return False, f"inputs on {hidden_states.device}, not cpu"
    if hidden_states.dtype not in _DTYPES:
        return False, f"dtype {hidden_states.dtype} (cpu backend: float32, bfloat16, float16)"
    if _int4_lists(experts, shared_expert) is None and _weight_lists(experts, shared_expert) is None:
        return False, "expert weights are neither plain contiguous CPU tensors of one dtype nor GPTQ 4-bit (offloaded?)"
    config = getattr(experts[0], "config", None)
    if config is not None and config.hidden_act not in ("silu", "swish"):
        return False, f"activation {config.hidden_act} (cpu backend: silu)"
    return True, ""


class _WeightView:
    """Where the op's weights live in the model: every expert MLP (and the shared one), its gate/up/down modules
    and their parameter dicts, captured once; `weights` is set once they are checked to be ones the op can read.
    Each call re-reads the identities with C-level iteration (map / itemgetter: ~30 us for 61 MLPs, against ~100 us
    for the Python loop it replaced). Re-reading rather than trusting the cache is what keeps accelerate's offload
    hooks (which write `_parameters` directly) and PEFT's module swaps visible."""

    def __init__(self, experts, shared_expert):
        self.experts, self.shared_expert = experts, shared_expert
        self.mlps = self._mlps()
        self.mlp_dicts = [m._modules for m in self.mlps]
        self.projs = list(itertools.chain.from_iterable(map(_PROJ_GETTER, self.mlp_dicts)))
        self.param_dicts = [p._parameters for p in self.projs]
        self.weights = None

    def _mlps(self):
        mlps = list(self.experts._modules.values())
        return mlps if self.shared_expert is None else [*mlps, self.shared_expert]

    def modules_unchanged(self):
        mlps = self._mlps()
        if len(mlps) != len(self.mlps) or not all(map(operator.is_, mlps, self.mlps)):
            return False
        try:
            projs = list(itertools.chain.from_iterable(map(_PROJ_GETTER, self.mlp_dicts)))
        except KeyError:  # a projection was deleted
            return False
        return all(map(operator.is_, projs, self.projs))

    def current(self):
        """The projections' weights as the model holds them now, or None if a module or a bias changed."""
        if not self.modules_unchanged():
            return None
        biases = list(map(dict.get, self.param_dicts, itertools.repeat("bias")))
        if biases.count(None) != len(biases):  # count() tests identity first: no tensor comparisons here
            return None
        return list(map(dict.get, self.param_dicts, itertools.repeat("weight")))


_PROJ_GETTER = operator.itemgetter(*_PROJ)


def _weight_lists(experts, shared_expert):
    """The per-expert weight tensors the op reads, as the model holds them (no copies); None if it cannot read them.
    Checked once and cached on the experts module; each call only re-checks that the same tensors are in place."""
    view = experts.__dict__.get("_qmoe_cpu_view")
    if view is not None and view.shared_expert is shared_expert:
        weights = view.current()
        if weights is not None and all(map(operator.is_, weights, view.weights)):
            return weights
    experts.__dict__.pop("_qmoe_cpu_view", None)
    try:
        view = _WeightView(experts, shared_expert)
    except (KeyError, AttributeError):  # not gate/up/down MLPs
        return None
    weights = view.current()
    ok = weights is not None and all(
        isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2
        and w.dtype == weights[0].dtype for w in weights
    ) and weights[0].dtype in _DTYPES
    if not ok:
        return None
    view.weights = weights
    experts.__dict__["_qmoe_cpu_view"] = view
    return weights


def _int4_lists(experts, shared_expert):
    """(expert tensors, shared tensors or [], zero_offset) for GPTQ 4-bit experts without bias, else None.
    Cached on the experts module; rebuilt only when GPTQLinear.generation says some GPTQ tensor may have moved."""
    from ..gptq.linear import GPTQLinear

    key = (GPTQLinear.generation, id(shared_expert))
    cached = experts.__dict__.get("_qmoe_int4")
    if cached is not None and experts.__dict__.get("_qmoe_int4_key") == key:
        # A module swapped in (PEFT wrapping an expert's projection, a layer dequantized back to nn.Linear)
        # changes no GPTQ tensor, so the generation does not see it: compare the modules themselves too.
        if experts.__dict__["_qmoe_int4_view"].modules_unchanged():
            return cached
    experts.__dict__.pop("_qmoe_int4", None)
    if not isinstance(experts[0]._modules.get("gate_proj"), GPTQLinear):
        return None  # full-precision experts: leave them to _weight_lists without building lists here
    layers = [m._modules.get(name) for m in experts for name in _PROJ]
    if not all(isinstance(layer, GPTQLinear) and layer.bits == 4 and layer.bias is None for layer in layers):
        return None
    shared_int4 = shared_expert is not None and all(
        isinstance(shared_expert._modules.get(n), GPTQLinear) and shared_expert._modules[n].bits == 4
        and shared_expert._modules[n].bias is None for n in _PROJ)
    mlps = list(experts) + ([shared_expert] if shared_int4 else [])
    tensors = [m._modules[name]._buffers[part] for m in mlps for name in _PROJ for part in _INT4_PARTS]
    offsets = {m._modules[name].zero_offset for m in mlps for name in _PROJ}
    if len(offsets) != 1 or not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    split = 12 * len(experts)
    cached = (tensors[:split], tensors[split:], offsets.pop())
    experts.__dict__["_qmoe_int4"] = cached
    experts.__dict__["_qmoe_int4_key"] = key
    experts.__dict__["_qmoe_int4_view"] = _WeightView(experts, shared_expert)
    return cached


def moe_forward_cpu(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
    int4 = experts.__dict__.get("_qmoe_int4")
    if int4 is not None:  # set by supports(), which dispatch always runs first
        expert_tensors, shared_tensors, zero_offset = int4
        gate = shared_expert_gate.weight if shared_tensors else None
        out = torch.ops.qwen2_moe_hf.moe_ffn_int4_cpu(hidden_states, topk_ids, topk_weights, expert_tensors,
                                                      shared_tensors, gate, zero_offset)
        if shared_expert is not None and not shared_tensors:  # a full-precision shared expert beside int4 experts
            out = out + torch.sigmoid(shared_expert_gate(hidden_states)) * shared_expert(hidden_states)
        return out
    weights = experts.__dict__["_qmoe_cpu_view"].weights
    gate, up, down = weights[0:3 * len(experts):3], weights[1:3 * len(experts):3], weights[2:3 * len(experts):3]
    shared = (None, None, None, None)
    if shared_expert is not None:
        shared = (*weights[3 * len(experts):], shared_expert_gate.weight)
    return torch.ops.qwen2_moe_hf.moe_ffn_cpu(hidden_states, topk_ids, topk_weights, gate, up, down, *shared)

