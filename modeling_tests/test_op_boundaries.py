"""Every compiled entry point, fed each kind of bad argument, in a child process: a clear error that names the
argument at fault, or the right result; never a signal.

The ops are public (torch.ops.qwen2_moe_hf.*, and the pybind functions the cpu backend calls directly), so each
must check, itself, every tensor it takes a pointer from. For each op the table starts from good arguments (tiny
layers where every expert gets tokens, so every weight is read) and changes one thing per case:

  noncontig   the same values in a non-contiguous view        -> the right result (the reference's)
  dtype       another dtype (float64 for floats, int32 <-> int64 for indices) -> an error naming the argument
  meta        the argument on the meta device                 -> an error naming the argument (or, when it is
                                                                 the op's only tensor, the fake's meta result)
  shape       one size off by one                             -> an error naming the argument (or, when it is
                                                                 the op's only tensor, the right result)
  range       index data out of range (expert ids, g_idx), or an integer argument at or past int32 / int64
              limits                                          -> an error naming it
  empty       no tokens at all (every token-sized argument)   -> the right (empty) result
  nan         NaN in the activations                          -> anything but a crash

Every op's cases run in one child process (`python test_op_boundaries.py FIRST`, FIRST the index of the first case
to run); a child killed by a signal fails its case with the signal and the end of its stderr, and the next child
resumes after it. Under `run_all.sh sanitize` the children load the AddressSanitizer + UBSan build, so a read out of
bounds fails here even when it would have passed by luck.
"""

import json
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import op_reference as ref  # noqa: E402

E, H, I, S, T, K, GROUP = 4, 16, 8, 24, 6, 2, 8
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------- good arguments


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])


def _int4(gen, n_out, n_in):
    """[qweight, qzeros, scales, g_idx] of a random Linear(n_in -> n_out), asymmetric, groups of 8."""
    from qwen2_moe_hf.gptq.format import quantize_rtn

    packed = quantize_rtn(_randn(gen, n_out, n_in), 4, GROUP, sym=False, zero_offset=1)
    return [packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"]]


def _routing():
    """Token t goes to experts t % E and (t + 1) % E: every expert gets tokens, so every weight is read."""
    ids = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    weights = torch.rand(T, K, generator=_gen(1))
    logits = torch.randn(T, E, generator=_gen(2))
    for t in range(T):
        logits[t, t % E] += 6
        logits[t, (t + 1) % E] += 5
    return ids, weights, logits


def _x(gen):
    x = torch.randn(T, H, generator=gen)
    for t in range(T):  # with router_weight = 5 * [I_E | 0], the router picks t % E, then (t + 1) % E
        x[t, :E] = 0
        x[t, t % E] += 1.2
        x[t, (t + 1) % E] += 1.0
    return x


def _dense_weights(gen):
    return OrderedDict(
        w_gate=[_randn(gen, I, H) for _ in range(E)], w_up=[_randn(gen, I, H) for _ in range(E)],
        w_down=[_randn(gen, H, I) for _ in range(E)], shared_gate=_randn(gen, S, H), shared_up=_randn(gen, S, H),
        shared_down=_randn(gen, H, S), shared_expert_gate=_randn(gen, 1, H))


def _int4_weights(gen):
    experts = []
    for _ in range(E):
        experts += _int4(gen, I, H) + _int4(gen, I, H) + _int4(gen, H, I)
    shared = _int4(gen, S, H) + _int4(gen, S, H) + _int4(gen, H, S)
    return OrderedDict(experts=experts, shared=shared, shared_expert_gate=_randn(gen, 1, H))


def _router_weight():
    w = torch.zeros(E, H)
    w[:, :E] = 5 * torch.eye(E)
    return w


def good_args(op):
    """The op's arguments, by name, in call order."""
    gen = _gen(0)
    ids, weights, logits = _routing()
    if op == "topk_softmax":
        return OrderedDict(logits=logits, k=K, renormalize=False)
    if op == "moe_align":
        return OrderedDict(ids=ids, num_experts=E, block=4)
    if op == "moe_combine":
        return OrderedDict(expert_out=torch.randn(T * K, H, generator=gen), weights=weights,
                           shared_out=torch.randn(T, H, generator=gen), shared_gate=torch.randn(T, 1, generator=gen))
    if op == "gptq_linear_cpu":
        qweight, qzeros, scales, g_idx = _int4(gen, 16, 64)
        return OrderedDict(x=torch.randn(3, 64, generator=gen), qweight=qweight, qzeros=qzeros, scales=scales,
                           g_idx=g_idx, zero_offset=1, bias=torch.randn(16, generator=gen))
    if op == "gptq_linears_cpu":  # two Linears (16 and 24 outputs) on one x, the second without a bias
        first, second = _int4(gen, 16, 64), _int4(gen, 24, 64)
        return OrderedDict(x=torch.randn(3, 64, generator=gen), linears=first + second,
                           biases=[torch.randn(16, generator=gen), torch.randn(24, generator=gen)], zero_offset=1)
    if op == "dense_linear_cpu":
        return OrderedDict(x=torch.randn(3, 64, generator=gen), weight=torch.randn(16, 64, generator=gen),
                           bias=torch.randn(16, generator=gen))
    if op == "decode_attention_cpu":  # 4 query heads on 2 key/value heads, 5 cached positions, one masked out
        mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        mask[1, 0, 0, 3] = False
        return OrderedDict(query=torch.randn(2, 4, 1, 8, generator=gen), key=torch.randn(2, 2, 5, 8, generator=gen),
                           value=torch.randn(2, 2, 5, 8, generator=gen), mask=mask, scaling=0.35)
    if op == "rms_norm_cpu":
        return OrderedDict(x=torch.randn(T, H, generator=gen), weight=torch.randn(H, generator=gen), eps=1e-6)
    if op == "rope_cpu":  # 4 query heads on 2 key heads, 3 positions, cos / sin per sequence
        return OrderedDict(query=torch.randn(2, 4, 3, 8, generator=gen), key=torch.randn(2, 2, 3, 8, generator=gen),
                           cos=torch.randn(2, 3, 8, generator=gen), sin=torch.randn(2, 3, 8, generator=gen))
    if op == "moe_ffn_cpu":
        return OrderedDict(x=_x(gen), topk_ids=ids, topk_weights=weights, **_dense_weights(gen))
    if op == "moe_ffn_int4_cpu":
        return OrderedDict(x=_x(gen), topk_ids=ids, topk_weights=weights, **_int4_weights(gen), zero_offset=1)
    if op == "moe_layer[dense]":
        d = _dense_weights(gen)
        tensors = [w for e in range(E) for w in (d["w_gate"][e], d["w_up"][e], d["w_down"][e])]
        tensors += [d["shared_gate"], d["shared_up"], d["shared_down"]]
        return OrderedDict(x=_x(gen), router_weight=_router_weight(), top_k=K, renormalize=False, tensors=tensors, experts=E, int4=False,
                           zero_offset=0, shared_expert_gate=d["shared_expert_gate"])
    if op == "moe_layer[int4]":
        w = _int4_weights(gen)
        return OrderedDict(x=_x(gen), router_weight=_router_weight(), top_k=K, renormalize=True, tensors=w["experts"] + w["shared"], experts=E,
                           int4=True, zero_offset=1, shared_expert_gate=w["shared_expert_gate"])
    if op.startswith("decode_layer["):
        return _decode_layer_args(gen, op == "decode_layer[int4]")
    raise KeyError(op)


# decode_layer: 4 query heads on 2 key/value heads of 8, 3 cached positions in buffers of 5.
NH, KVH, D, HELD, CAP = 4, 2, 8, 3, 5


def _decode_layer_args(gen, int4):
    """One decode position through a whole layer: the pack's tensors (norms, q/k/v/o), the cache buffers, the
    MoE block's (as moe_layer's)."""
    moe = _int4_weights(gen) if int4 else _dense_weights(gen)
    if int4:
        projections = _int4(gen, NH * D, H) + _int4(gen, KVH * D, H) + _int4(gen, KVH * D, H) + _int4(gen, H, NH * D)
        tensors = moe["experts"] + moe["shared"]
    else:
        projections = [_randn(gen, NH * D, H), _randn(gen, KVH * D, H), _randn(gen, KVH * D, H), _randn(gen, H, NH * D)]
        tensors = [w for e in range(E) for w in (moe["w_gate"][e], moe["w_up"][e], moe["w_down"][e])]
        tensors += [moe["shared_gate"], moe["shared_up"], moe["shared_down"]]
    angles = torch.rand(1, 1, D // 2, generator=gen) * 3
    mask = torch.ones(1, 1, 1, HELD + 1, dtype=torch.bool)
    mask[0, 0, 0, 1] = False
    return OrderedDict(
        hidden=torch.randn(1, 1, H, generator=gen), cos=torch.cat([angles.cos()] * 2, -1),
        sin=torch.cat([angles.sin()] * 2, -1), key_cache=torch.randn(1, KVH, CAP, D, generator=gen),
        value_cache=torch.randn(1, KVH, CAP, D, generator=gen), held=HELD, mask=mask,
        ln1=1 + 0.1 * torch.randn(H, generator=gen), eps1=1e-6, ln2=1 + 0.1 * torch.randn(H, generator=gen), eps2=1e-5,
        projections=projections, biases=[torch.randn(NH * D, generator=gen), torch.randn(KVH * D, generator=gen),
                                         torch.randn(KVH * D, generator=gen), None],
        int4=int4, zero_offset=1 if int4 else 0, heads=NH, kv_heads=KVH, head_dim=D, scaling=D ** -0.5,
        router_weight=_router_weight(), top_k=K, renormalize=int4, tensors=tensors, experts=E,
        shared_expert_gate=moe["shared_expert_gate"], norm_weight=1 + 0.1 * torch.randn(H, generator=gen),
        norm_eps=1e-5)


# ----------------------------------------------------------------------------------------------- calls


def _ops():
    return torch.ops.qwen2_moe_hf


def _module():
    from qwen2_moe_hf.kernels.build import cpu_module

    return cpu_module()


def call(op, a):
    """Run the op under test on arguments `a`."""
    if op.startswith("moe_layer["):
        m = _module()
        pack = m.LayerPack(a["tensors"], a["experts"], a["int4"], a["zero_offset"])
        return m.moe_layer(a["x"], a["router_weight"], a["top_k"], a["renormalize"], pack, a["shared_expert_gate"])
    if op.startswith("decode_layer["):
        m = _module()
        pack = m.DecodeLayerPack(a["ln1"], a["eps1"], a["ln2"], a["eps2"], a["projections"], a["biases"], a["int4"],
                                 a["zero_offset"], a["heads"], a["kv_heads"], a["head_dim"], a["scaling"])
        moe = m.LayerPack(a["tensors"], a["experts"], a["int4"], a["zero_offset"])
        out, logits, keys, values = m.decode_layers(
            a["hidden"], [(a["key_cache"], a["value_cache"], a["held"], a["mask"], a["cos"], a["sin"], pack,
                           a["router_weight"], a["top_k"], a["renormalize"], moe, a["shared_expert_gate"])],
            a["norm_weight"], a["norm_eps"])
        n = a["held"] + 1  # the views the cache layer commits: the buffers' first held + 1 positions
        assert keys[0].data_ptr() == a["key_cache"].data_ptr() and keys[0].shape[2] == n
        assert values[0].data_ptr() == a["value_cache"].data_ptr() and values[0].shape[2] == n
        return out, logits[0]
    return getattr(_ops(), op)(*a.values())


def _dense_from_pack(a):
    t, n = a["tensors"], 3 * a["experts"]
    return (t[0:n:3], t[1:n:3], t[2:n:3], *t[n:], a["shared_expert_gate"])


# The references of the registered ops take the op's own arguments, in order.
REFERENCES = {"topk_softmax": ref.topk_softmax, "moe_align": ref.moe_align, "moe_combine": ref.moe_combine,
              "gptq_linear_cpu": ref.gptq_linear, "dense_linear_cpu": ref.dense_linear, "moe_ffn_cpu": ref.moe_ffn,
              "decode_attention_cpu": ref.decode_attention, "rms_norm_cpu": ref.rms_norm, "rope_cpu": ref.rope,
              "moe_ffn_int4_cpu": ref.moe_ffn_int4,
              "gptq_linears_cpu": lambda x, linears, biases, zero_offset: [
                  ref.gptq_linear(x, *linears[i:i + 4], zero_offset, biases[i // 4])
                  for i in range(0, len(linears), 4)]}


def _moe_weights(a):
    if a["int4"]:
        n = 12 * a["experts"]
        return (*ref.int4_expert_weights(a["tensors"][:n], a["tensors"][n:], a["zero_offset"]), a["shared_expert_gate"])
    return _dense_from_pack(a)


def _decode_layer_reference(a):
    """The layer, op by op: norm, q/k/v, RoPE, attention over the cached positions and the new one, o, residual,
    norm, the MoE block, residual."""
    def linear(x, i):
        if a["int4"]:
            return ref.gptq_linear(x, *a["projections"][4 * i:4 * i + 4], a["zero_offset"], a["biases"][i])
        return ref.dense_linear(x, a["projections"][i], a["biases"][i])

    h = a["hidden"].reshape(1, -1)
    x = ref.rms_norm(h, a["ln1"], a["eps1"])
    q, k, v = (linear(x, i).view(1, 1, -1, a["head_dim"]).transpose(1, 2) for i in range(3))
    q, k = ref.rope(q, k, a["cos"], a["sin"])
    held = a["held"]
    keys = torch.cat([a["key_cache"][:, :, :held], k], 2)
    values = torch.cat([a["value_cache"][:, :, :held], v], 2)
    attn = ref.decode_attention(q, keys, values, a["mask"], a["scaling"])
    h1 = h + linear(attn.reshape(1, -1), 3)
    x2 = ref.rms_norm(h1, a["ln2"], a["eps2"])
    logits = (x2.float() @ a["router_weight"].float().t()).to(x2.dtype)
    out = h1 + ref.moe_block(x2, logits, a["top_k"], a["renormalize"], *_moe_weights(a))
    out = ref.rms_norm(out, a["norm_weight"], a["norm_eps"])  # the model's final norm, given to the last layer's call
    return out.view(a["hidden"].shape), logits


def _decode_layer_experts(a):
    """The two experts the token goes to (the only ones whose weights the op reads)."""
    _, logits = _decode_layer_reference(a)
    return sorted(logits.float().topk(K, -1).indices[0].tolist())


def reference(op, a):
    """What the op must return for arguments `a` (plain torch, float32 inside)."""
    if op in REFERENCES:
        return REFERENCES[op](*a.values())
    if op.startswith("decode_layer["):
        return _decode_layer_reference(a)
    if op.startswith("moe_layer["):
        if a["int4"]:
            n = 12 * a["experts"]
            weights = ref.int4_expert_weights(a["tensors"][:n], a["tensors"][n:], a["zero_offset"])
            weights = (*weights, a["shared_expert_gate"])
        else:
            weights = _dense_from_pack(a)
        logits = (a["x"].float() @ a["router_weight"].float().t()).to(a["x"].dtype)
        return ref.moe_block(a["x"], logits, a["top_k"], a["renormalize"], *weights), logits
    raise KeyError(op)


def compare(op, got, want, dtype):
    """None when equal within the dtype's tolerance, else what differs."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i}: shape {list(g.shape)}, expected {list(w.shape)}"
        if not g.dtype.is_floating_point:
            if not torch.equal(g.long(), w.long()):
                return f"output {i}: {g.tolist()} != {w.tolist()}"
            continue
        err = ref.row_error(g, w)
        if not err <= ref.TOLERANCE[dtype]:
            return f"output {i}: per-row relative error {err:.2e} > {ref.TOLERANCE[dtype]:.0e}"
    return None


# ----------------------------------------------------------------------------------------------- cases


def _noncontig(t):
    """The same values, not contiguous: every other element of a tensor twice as wide."""
    view = torch.stack([t, t], -1)[..., 0]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def _other_dtype(t):
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.double()
    return t.int() if t.dtype == torch.int64 else t.long()


def _off_by_one(t):
    return t[..., :-1].contiguous() if t.shape[-1] > 1 else torch.cat([t, t], -1)


MUTATIONS = OrderedDict(noncontig=_noncontig, dtype=_other_dtype, meta=lambda t: t.to("meta"), shape=_off_by_one)


def _label(op, name, index=None):
    """A regex for how errors name argument `name` (element `index` of a list): the fakes use the Python names
    (w_up[1]), the C++ checks the role (expert 1 up weight)."""
    py = re.escape(name if index is None else f"{name}[{index}]")
    roles = {"w_gate": "gate", "w_up": "up", "w_down": "down"}
    parts = ("qweight", "qzeros", "scales", "g_idx")
    projs = ("gate_proj", "up_proj", "down_proj")
    if index is None:
        cpp = {"shared_gate": "shared expert gate weight", "shared_up": "shared expert up weight",
               "shared_down": "shared expert down weight"}.get(name) if "int4" not in op else None
        if op == "moe_combine":
            cpp = None
        return rf"(?<![\w.]){py}(?![\w\[])" + (f"|{re.escape(cpp)}" if cpp else "")
    if name in roles:
        return rf"{py}|expert {index} {roles[name]} weight"
    if name == "experts" or (name == "tensors" and "int4" in op and index < 12 * E):
        return rf"{py}|expert {index // 12} {projs[index % 12 // 4]}: {parts[index % 4]}"
    if name == "shared" or (name == "tensors" and "int4" in op):
        j = index if name == "shared" else index - 12 * E
        return rf"{py}|shared expert {projs[j // 4]}: {parts[j % 4]}"
    if name == "linears":  # gptq_linears_cpu: four tensors per Linear
        return rf"{py}|linear {index // 4}: {parts[index % 4]}"
    if name == "projections" and "decode_layer" in op:  # errors name the projection's slice of the list
        if "int4" in op:
            return re.escape("projections[0:12]") if index < 12 else re.escape("[12:16]")
        return py
    if name == "biases":
        return re.escape("biases[0:3]") if "decode_layer[int4]" in op and index < 3 else py
    if name == "tensors":  # dense pack: gate, up, down per expert, then the shared expert's
        if index < 3 * E:
            return rf"{py}|expert {index // 3} {('gate', 'up', 'down')[index % 3]} weight"
        return rf"{py}|shared expert {('gate', 'up', 'down')[index - 3 * E]} weight"
    raise KeyError(name)


# Which list elements each mutation is tried on: every kind of tensor a list holds, not all E copies.
_LIST_ELEMENTS = {
    "w_gate": [0, 1], "w_up": [1], "w_down": [2],
    "experts": [0, 12 + 4, 12 + 5, 12 + 6, 12 + 7, 24 + 8, 24 + 11],  # expert 1 up (all four), expert 2 down
    "shared": [0, 5, 10, 11],
    "linears": [0, 1, 2, 3, 4 + 2], "biases": [1],
}


def _tensor_targets(op, args):
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            yield name, None
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            if name == "tensors" and "decode_layer" in op:  # one token: only its top-k experts are read
                e0, e1 = _decode_layer_experts(args)
                if "int4" in op:
                    picks = [12 * e0 + 4, 12 * e0 + 7, 12 * e1 + 9, 12 * E + 1, 12 * E + 11]
                else:
                    picks = [3 * e0, 3 * e1 + 1, 3 * e1 + 2, 3 * E, 3 * E + 2]
            elif name == "tensors":
                if "int4" in op:
                    picks = [12 + 4, 12 + 7, 24 + 9, 12 * E + 1, 12 * E + 11]
                else:
                    picks = [0, 3 + 1, 6 + 2, 3 * E, 3 * E + 2]
            elif name == "projections":
                picks = [0, 5, 11, 12, 15] if "int4" in op else [0, 1, 2, 3]
            elif name == "biases" and "decode_layer" in op:
                picks = [0, 2]
            else:
                picks = _LIST_ELEMENTS[name]
            for i in picks:
                yield name, i


def _replace(args, name, index, fn):
    new = OrderedDict(args)
    if index is None:
        new[name] = fn(args[name])
    else:
        new[name] = list(args[name])
        new[name][index] = fn(args[name][index])
    return new


_TOKEN_SIZED = ("x", "logits", "router_logits", "topk_ids", "topk_weights", "ids", "weights", "expert_out",
                "shared_out")


def _empty(op, args):
    """Every token-sized argument with no tokens (moe_combine's shared_gate is per token; the MoE ops' is the
    shared expert's gate weight)."""
    new = OrderedDict(args)
    for name in _TOKEN_SIZED + (("shared_gate",) if op == "moe_combine" else ()):
        if name in new:
            new[name] = new[name][:0]
    return new


def _nan(op, args):
    """NaN in the activations, or None for an op without float inputs."""
    key = next((k for k in ("x", "logits", "expert_out", "query") if k in args), None)
    if key is None:
        return None
    value = args[key].clone()
    value[1, 2] = float("nan")
    return _replace(args, key, None, lambda _: value)


def _scalar_cases(op, args):
    """(case, args, regex of the error) for integer arguments at and past their limits."""
    out = []

    def bad(name, values, regex):
        for v in values:
            out.append((f"{name}={v}", _replace(args, name, None, lambda _, v=v: v), regex))

    if "k" in args:
        bad("k", [0, E + 1, 2**31, -1], r"\bk=-?\d+ must be in")
    if "top_k" in args:
        bad("top_k", [0, E + 1, 2**40], r"top_k=-?\d+ must be in")
    if "num_experts" in args:
        bad("num_experts", [0, 2**31, 2**63 - 1], r"num_experts=-?\d+ must be in")
    if "block" in args:
        bad("block", [0, 2**31, 2**62], r"block=-?\d+ must be in")
    if "zero_offset" in args and op != "moe_layer[dense]":
        bad("zero_offset", [2, -1, 2**40], r"zero_offset=-?\d+ must be in")
    for name in ("scaling", "eps"):
        if name in args:
            bad(name, [math.inf, math.nan] + ([-1.0] if name == "eps" else []), rf"{name} must be finite")
    if "held" in args:
        bad("held", [-1, CAP, 2**40], r"held=-?\d+ must be in")
        bad("eps1", [math.inf, math.nan, -1.0], r"eps must be finite")
        bad("norm_eps", [math.inf, math.nan, -1.0], r"norm_eps must be finite")
        bad("heads", [0, 2**40], r"heads=-?\d+ must be in")
        bad("kv_heads", [0, NH + 1], r"kv_heads=-?\d+ must be in")
        bad("kv_heads", [3], r"heads \(\d+\) must be a multiple of kv_heads")
        bad("head_dim", [7], r"head_dim must be even")
        bad("head_dim", [0, 2**40], r"head_dim=-?\d+ must be in")
    if "experts" in args and isinstance(args["experts"], int):
        bad("experts", [0, -1, 2**62], r"LayerPack: (experts=-?\d+ must be in|expected \d+ tensors)")
    return out


def _range_cases(op, args):
    """Index data out of range: expert ids and g_idx."""
    out = []
    if "topk_ids" in args or "ids" in args:
        name = "topk_ids" if "topk_ids" in args else "ids"
        for v in (E, -1, 2**40):
            ids = args[name].clone()
            ids[3, 1] = v
            out.append((f"{name}[3,1]={v}", _replace(args, name, None, lambda _, ids=ids: ids),
                        r"expert id -?\d+ out of range"))
    g_targets = []
    if "g_idx" in args:
        g_targets.append(("g_idx", None))
    if "experts" in args and isinstance(args["experts"], list):
        g_targets.append(("experts", 12 + 7))  # expert 1 up_proj's g_idx
    if "shared" in args:
        g_targets.append(("shared", 11))  # the shared expert's down_proj's g_idx
    if op == "moe_layer[int4]":
        g_targets.append(("tensors", 24 + 11))  # expert 2 down_proj's g_idx
    if op == "decode_layer[int4]":  # q_proj's and o_proj's g_idx, the second chosen expert's down_proj's
        g_targets += [("projections", 3), ("projections", 15), ("tensors", 12 * _decode_layer_experts(args)[1] + 11)]
    if op == "gptq_linears_cpu":
        g_targets.append(("linears", 4 + 3))  # the second Linear's g_idx
    for name, index in g_targets:
        scales = args["scales"] if index is None else args[name][index - 1]  # g_idx follows its scales
        for v in (scales.shape[0], -1, INT32_MAX):
            def edit(t, v=v):
                t = t.clone()
                t[5] = v
                return t
            out.append((f"{name}{'' if index is None else f'[{index}]'}.g_idx[5]={v}",
                        _replace(args, name, index, edit), r"g_idx\[5\] = -?\d+ is outside the \d+ groups"))
    return out


def _dtype_of(op, args):
    key = next(k for k in ("x", "logits", "expert_out", "ids", "query", "hidden") if k in args)
    return args[key].dtype if args[key].dtype.is_floating_point else torch.float32


def cases(op):
    """[(case id, args, expectation)], expectation: ("same",) | ("error", regex) | ("no_crash",)."""
    args = good_args(op)
    table = [("good", args, ("same",)), ("empty", _empty(op, args), ("same",))]
    if _nan(op, args) is not None:
        table.append(("nan", _nan(op, args), ("no_crash",)))
    for name, index in _tensor_targets(op, args):
        where = name if index is None else f"{name}[{index}]"
        for kind, fn in MUTATIONS.items():
            expect = ("same",) if kind == "noncontig" else ("error", _label(op, name, index))
            tensor_args = sum(isinstance(v, torch.Tensor) or isinstance(v, list) and any(
                isinstance(t, torch.Tensor) for t in v) for v in args.values())
            if tensor_args == 1 and index is None:
                if kind == "meta":
                    expect = ("error_or_meta", expect[1])  # all inputs meta: the fake answers, on meta
                elif kind == "shape":
                    expect = ("same",)  # the only tensor: any size is a valid input
            table.append((f"{where}:{kind}", _replace(args, name, index, fn), expect))
    for case, bad_args, regex in _scalar_cases(op, args) + _range_cases(op, args):
        table.append((case, bad_args, ("error", regex)))
    return table


CPU_OPS = ["topk_softmax", "moe_align", "moe_combine", "gptq_linear_cpu", "gptq_linears_cpu", "dense_linear_cpu",
           "decode_attention_cpu", "rms_norm_cpu", "rope_cpu", "moe_ffn_cpu",
           "moe_ffn_int4_cpu", "moe_layer[dense]", "moe_layer[int4]", "decode_layer[dense]", "decode_layer[int4]"]


def run_case(op, case_id, args, expect):
    """-> (passed, detail)."""
    try:
        got = call(op, args)
    except Exception as exc:  # noqa: BLE001 (the error itself is what is checked)
        message = f"{type(exc).__name__}: {exc}".split("\nException raised from")[0][:600]
        if expect[0] in ("error", "error_or_meta"):
            ok = isinstance(exc, (RuntimeError, ValueError, TypeError)) and re.search(expect[1], message)
            return bool(ok), message if not ok else ""
        if expect[0] == "no_crash":
            return True, ""
        return False, f"raised instead of computing: {message}"
    if expect[0] == "error_or_meta":
        outputs = got if isinstance(got, (tuple, list)) else (got,)
        on_meta = all(t.device.type == "meta" for t in outputs)
        return on_meta, "" if on_meta else "returned real tensors for meta inputs"
    if expect[0] == "error":
        return False, f"returned a result; expected an error matching {expect[1]!r}"
    if expect[0] == "no_crash":
        return True, ""
    want = reference(op, args)
    diff = compare(op, got, want, _dtype_of(op, args))
    return diff is None, diff or ""


# ----------------------------------------------------------------------------------------------- the child


def _flat_cases():
    """(op, case id, args, expect) of every op's cases in table order, made one op at a time."""
    for op in CPU_OPS:
        for case_id, args, expect in cases(op):
            yield op, case_id, args, expect


def child(first):
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    ok, why = load_cpu_ops()
    if not ok:
        print("UNAVAILABLE " + json.dumps(why), flush=True)
        return
    for i, (op, case_id, args, expect) in enumerate(_flat_cases()):
        if i < first:
            continue
        print("START " + json.dumps([i, op, case_id]), flush=True)
        with torch.no_grad():
            passed, detail = run_case(op, case_id, args, expect)
        print("RESULT " + json.dumps([i, op, case_id, passed, detail]), flush=True)
    print("DONE", flush=True)


# ----------------------------------------------------------------------------------------------- the parent


def _run_all():
    """{(op, case id): (passed, detail)} for every case of every op, run in one child process (one start of the
    interpreter and the extension instead of one per op: ~4 s each); after a crash, a new child resumes at the next
    case, and the crashed case fails with the signal and the child's stderr."""
    results, first = {}, 0
    while True:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(first)], capture_output=True,
                              text=True, timeout=1800, env=dict(os.environ))
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("UNAVAILABLE "):
                pytest.fail(f"the CPU ops did not load in the child: {json.loads(line[12:])}")
            if line.startswith("START "):
                started = json.loads(line[6:])
            elif line.startswith("RESULT "):
                i, op, case_id, passed, detail = json.loads(line[7:])
                results[op, case_id] = (passed, detail)
                started = None
        if "DONE" in proc.stdout.splitlines():
            return results
        if started is None:
            pytest.fail(f"the child ended without a result (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        i, op, case_id = started
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        results[op, case_id] = (False, f"the process died ({how}):\n{proc.stderr[-4000:]}")
        first = i + 1


_RESULTS = {}


def _case_ids():
    try:
        return [(op, case_id) for op in CPU_OPS for case_id, _, _ in cases(op)]
    except Exception as exc:  # noqa: BLE001 (collection must not die: one failing test says why)
        return [("collection", f"failed: {exc!r}")]


@pytest.fixture(scope="module")
def cpu_ops_available():
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    ok, why = load_cpu_ops()  # built here once, before the children load it
    if not ok:
        pytest.skip(f"CPU ops unavailable: {why}")


@pytest.mark.parametrize("op,case_id", _case_ids())
def test_op_boundary(op, case_id, cpu_ops_available):
    assert op != "collection", case_id
    if not _RESULTS:
        _RESULTS.update(_run_all())
    passed, detail = _RESULTS.get((op, case_id), (False, "no result"))
    assert passed, f"{op} [{case_id}]: {detail}"


def test_every_compiled_entry_point_is_in_the_table():
    """A new op (schema) or pybind function must get its rows here."""
    from qwen2_moe_hf.kernels.ops import SCHEMAS

    covered = {op.split("[")[0] for op in CPU_OPS}
    cpu_schemas = {name for name in SCHEMAS if name.endswith("_cpu") or name in ("topk_softmax", "moe_align",
                                                                                  "moe_combine")}
    assert cpu_schemas <= covered, sorted(cpu_schemas - covered)
    from qwen2_moe_hf.kernels.build import load_cpu_ops, cpu_module

    if load_cpu_ops()[0]:
        functions = {n for n in dir(cpu_module()) if not n.startswith("_")}
        switches = {*PATH_SWITCHES, *(s for s in PATH_SWITCHES.values() if s)}
        kept = {"workspace_bytes", "release_workspace"}  # the layers' kept workspace (test_cpu_layer.py)
        layer = {"DecodeLayerPack", "decode_layers"}  # whole decode layers (moe/decode_layer.py)
        assert functions == {"IdentityWatch", "LayerPack", "moe_layer", *layer, *kept, *switches}, functions


# The module's switches of its ISA-dependent paths (native_bf16.h, int4_vnni.h): getter -> setter.
PATH_SWITCHES = {"native_bf16_rows": "set_native_bf16_rows", "native_int4_rows": "set_native_int4_rows",
                 "int4_vnni": "set_int4_vnni", "int4_vnni_row": "set_int4_vnni_row", "int4_vnni_compiled": None,
                 "int4_path": None, "dense_row_lanes": "set_dense_row_lanes", "bf16_dot": "set_bf16_dot",
                 "bf16_dot_compiled": None, "int4_jobs_together": "set_int4_jobs_together"}


def test_path_switches_refuse_bad_values_and_restore_the_cpu_default():
    from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops

    if not load_cpu_ops()[0]:
        pytest.skip("CPU ops unavailable")
    module = cpu_module()
    for getter in ("native_bf16_rows", "native_int4_rows"):
        setter = getattr(module, PATH_SWITCHES[getter])
        default = getattr(module, getter)()
        try:
            for bad, error in ((-2, RuntimeError), ("4", TypeError), (None, TypeError), (1.5, TypeError)):
                with pytest.raises(error):
                    setter(bad)
                assert getattr(module, getter)() == default  # a refused value changes nothing
            setter(7)
            assert getattr(module, getter)() == 7
        finally:
            setter(-1)
        assert getattr(module, getter)() == default
    # On / off switches: getter -> what it reads when switched on (a path runs only where the build has it; the
    # lanes kernel is compiled in the same AVX-512 builds as the VNNI one).
    on = {"int4_vnni": module.int4_vnni_compiled(), "int4_vnni_row": True,
          "dense_row_lanes": module.int4_vnni_compiled(), "bf16_dot": module.bf16_dot_compiled(),
          "int4_jobs_together": True}
    for getter, when_on in on.items():
        setter = getattr(module, PATH_SWITCHES[getter])
        with pytest.raises(TypeError):
            setter("yes")
        setter(False)
        assert getattr(module, getter)() is False, getter
        setter(True)
        assert getattr(module, getter)() is when_on, getter


_WATCH_CHILD = r"""
import json
from qwen2_moe_hf.kernels.build import load_cpu_ops, cpu_module
assert load_cpu_ops()[0]
W = cpu_module().IdentityWatch
d = {"a": 1}
cases = {
    "lengths": (lambda: W([d, d], ["a"], [1]), "one length"),
    "not a list": (lambda: W((d,), ["a"], [1]), "incompatible constructor arguments"),
    "not a dict": (lambda: W([[1]], ["a"], [1]), r"dicts\[0\] must be a dict, not list"),
    "key not a str": (lambda: W([d], [0], [1]), r"keys\[0\] must be a str, not int"),
    "key a str subclass": (lambda: W([d], [type("S", (str,), {})("a")], [1]), r"keys\[0\] must be a str"),
    "none": (lambda: W(None, None, None), "incompatible constructor arguments"),
    "empty not a dict": (lambda: W([d], ["a"], [1], [d, [1]]), r"empty\[1\] must be a dict, not list"),
    "empty not a list": (lambda: W([d], ["a"], [1], d), "incompatible constructor arguments"),
}
for name, (make, regex) in cases.items():
    try:
        make()
        print("RESULT", json.dumps([name, "no error", regex]))
    except Exception as exc:
        print("RESULT", json.dumps([name, f"{type(exc).__name__}: {exc}", regex]))
# Empty is valid (a layer with no watched slots), and the watch keeps its objects alive.
print("EMPTY", W([], [], []).current())
e = {"a": object()}
w = W([e], ["a"], [e["a"]])
del e
print("ALIVE", w.current())
h = {}
w = W([], [], [], [h])
h["hook"] = 1
print("HOOKED", w.current())
"""


def test_identity_watch_refuses_bad_arguments(cpu_ops_available):
    """The pybind IdentityWatch (identity_watch.h) takes dicts, keys and objects, not tensors: its bad arguments are
    wrong lengths, non-dicts, non-str keys (whose hash could run Python code during the check). Each must raise a
    clear error, in a child process so that a crash fails this test rather than the run."""
    import re

    proc = subprocess.run([sys.executable, "-c", _WATCH_CHILD], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    assert len(results) == 8, proc.stdout
    for name, got, regex in results:
        assert re.search(regex, got), f"{name}: {got!r} does not match {regex!r}"
    assert "EMPTY True" in lines and "ALIVE True" in lines and "HOOKED False" in lines, proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA twins (csrc/cuda/moe_ops.cu) "
                    "share csrc/common/checks.h with the CPU ops checked above, and compile in the cuda-build stack")
def test_cuda_op_boundaries():
    from qwen2_moe_hf.kernels.build import load_cuda_ops

    ok, why = load_cuda_ops()
    assert ok, why
    ops = torch.ops.qwen2_moe_hf
    for op in ("topk_softmax", "moe_align", "moe_combine"):
        args = OrderedDict((k, v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in good_args(op).items())
        got = getattr(ops, op)(*args.values())
        want = reference(op, OrderedDict((k, v.cpu() if isinstance(v, torch.Tensor) else v)
                                         for k, v in args.items()))
        got = tuple(g.cpu() for g in got) if isinstance(got, tuple) else got.cpu()
        assert compare(op, got, want, torch.float32) is None
        for name, index in _tensor_targets(op, args):
            for kind in ("dtype", "shape"):
                with pytest.raises(RuntimeError, match=_label(op, name, index)):
                    getattr(ops, op)(*_replace(args, name, index, MUTATIONS[kind]).values())
            with pytest.raises(RuntimeError, match=_label(op, name, index)):  # a CPU tensor among CUDA ones
                getattr(ops, op)(*_replace(args, name, index, lambda t: t.cpu()).values())


if __name__ == "__main__":
    child(int(sys.argv[1]))
