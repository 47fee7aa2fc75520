"""Property tests (hypothesis) of every CPU op on random views of its arguments: each tensor, inputs and weights
alike, is laid out at random (dimensions stored in any order, i.e. transposed; every n-th element of a larger
buffer; a storage offset) around a buffer filled with garbage, and the op must still equal the plain-torch
reference (op_reference.py) within its dtype's tolerance. Sizes, dtypes, routing and GPTQ settings are drawn too.

A kernel that ignored a stride, an offset or a transpose would read the garbage and fail; under
`run_all.sh sanitize` (AddressSanitizer + UBSan build) one that read past its buffer fails even when the bytes
there happened to be harmless."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
import op_reference as ref
from qwen2_moe_hf.gptq.format import quantize_rtn
from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops
from qwen2_moe_hf.modeling_qwen2_moe import apply_rotary_pos_emb

OK, WHY = load_cpu_ops()


@pytest.fixture(autouse=True)
def _one_rounding():
    """The ops' contract checked here is one rounding of fp32 sums (op_reference.TOLERANCE); the oneDNN and VNNI
    paths round more (as the torch path does) and are tested against their own bounds (test_cpu_layer.py,
    test_gptq.py)."""
    with helpers.own_cpu_kernels():
        yield
pytestmark = pytest.mark.skipif(not OK, reason=f"CPU ops unavailable: {WHY}")
ops = torch.ops.qwen2_moe_hf
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------- random views


@st.composite
def layouts(draw, ndim):
    """(storage order of the dims, step per dim, storage offset)."""
    order = draw(st.permutations(list(range(ndim))))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=ndim, max_size=ndim))
    return order, steps, draw(st.integers(0, 3))


def _garbage(dtype):
    return 1e4 if dtype.is_floating_point else 1 << 20


def materialize(value, layout):
    """A tensor equal to `value`, with `layout`'s strides and storage offset, in a buffer of garbage."""
    order, steps, offset = layout
    shape = value.shape
    stored = [shape[d] * steps[d] for d in order]
    base = torch.full((math.prod(stored) + offset,), _garbage(value.dtype), dtype=value.dtype)
    big = base[offset:].view(stored)
    strided = big[tuple(slice(None, None, steps[d]) for d in order)]
    view = strided.permute([order.index(d) for d in range(len(order))])
    assert view.shape == shape
    view.copy_(value)
    return view


class Views(list):
    """Tensors shown by their layout (shape, strides, storage offset) when hypothesis reports a draw."""

    def __repr__(self):
        return "Views(" + ", ".join("None" if t is None else f"{tuple(t.shape)}/{t.stride()}+{t.storage_offset()}"
                                    for t in self) + ")"


@st.composite
def views_of(draw, tensors):
    """Random views of a list of tensors (None passes through)."""
    return Views(None if t is None else materialize(t, draw(layouts(t.dim()))) for t in tensors)


def _with_views(data, args):
    """args with every tensor replaced by a random view of it."""
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    out = list(args)
    for i, view in zip(where, data.draw(views_of([args[i] for i in where]))):
        out[i] = view
    return out


def _check(got, want, dtype):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if g.dtype.is_floating_point:
            err = ref.row_error(g, w)
            assert err <= ref.TOLERANCE[dtype], f"per-row relative error {err:.2e}"
        else:
            assert torch.equal(g, w)


def _randn(gen, *shape, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) / math.sqrt(max(shape[-1], 1))).to(dtype)


# ----------------------------------------------------------------------------------------------- routing ops


@PROPERTY
@given(tokens=st.integers(0, 9), experts=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOATS), renormalize=st.booleans())
def test_topk_softmax(tokens, experts, data, seed, dtype, renormalize):
    k = data.draw(st.integers(1, experts))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (view,) = data.draw(views_of([logits]))
    weights, ids = ops.topk_softmax(view, k, renormalize)
    probs = torch.softmax(logits.float(), -1)
    # The contract: the k largest logits, descending (so the k largest probabilities), lower ids first among equal
    # logits, weights the (renormalised) probabilities of those ids.
    picked = probs.gather(1, ids) if tokens else probs[:, :k]
    want = picked / picked.sum(-1, keepdim=True) if renormalize else picked
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-7)
    if tokens:
        rest = probs.scatter(1, ids, -1.0)
        assert (picked[:, -1:] >= rest.max(-1, keepdim=True).values).all()
        assert (picked[:, :-1] >= picked[:, 1:]).all()
        chosen = logits.float().gather(1, ids)
        assert (chosen[:, :-1] >= chosen[:, 1:]).all()
        ties = (chosen[:, :-1] == chosen[:, 1:]) & (ids[:, :-1] > ids[:, 1:])
        assert not ties.any(), "equal logits must go to the lower expert id first"


@PROPERTY
@given(tokens=st.integers(0, 9), k=st.integers(1, 3), experts=st.integers(1, 9), block=st.sampled_from([1, 2, 4, 16]),
       data=st.data(), seed=st.integers(0, 2**16))
def test_moe_align(tokens, k, experts, block, data, seed):
    ids = torch.randint(0, experts, (tokens, k), generator=torch.Generator().manual_seed(seed))
    (view,) = data.draw(views_of([ids]))
    _check(ops.moe_align(view, experts, block), ref.moe_align(ids, experts, block), torch.float32)


@PROPERTY
@given(tokens=st.integers(0, 7), k=st.integers(1, 4), hidden=st.integers(1, 40), shared=st.booleans(),
       data=st.data(), seed=st.integers(0, 2**16), dtype=st.sampled_from(FLOATS))
def test_moe_combine(tokens, k, hidden, shared, data, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(tokens * k, hidden, generator=gen).to(dtype), torch.rand(tokens, k, generator=gen),
            torch.randn(tokens, hidden, generator=gen).to(dtype) if shared else None,
            torch.randn(tokens, 1, generator=gen) if shared else None]
    _check(ops.moe_combine(*data.draw(views_of(args))), ref.moe_combine(*args), dtype)


# ----------------------------------------------------------------------------------------------- int4 linear


def _int4(gen, n_out, n_in, group, sym, act_order, zero_offset):
    size = n_in if group == -1 else group
    g_idx = torch.randperm(n_in, generator=gen) // size if act_order else None
    packed = quantize_rtn(_randn(gen, n_out, n_in), 4, group, sym, zero_offset, g_idx)
    return [packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"]]


@st.composite
def int4_settings(draw):
    return dict(group=draw(st.sampled_from([8, 16, -1])), sym=draw(st.booleans()), act_order=draw(st.booleans()),
                zero_offset=draw(st.sampled_from([0, 1])))


@PROPERTY
@given(rows=st.integers(0, 40), n_in=st.sampled_from([8, 16, 48]), n_out=st.sampled_from([8, 16, 24, 40]),
       q=int4_settings(), bias=st.booleans(), data=st.data(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOATS), scales_dtype=st.sampled_from(FLOATS))
def test_gptq_linear(rows, n_in, n_out, q, bias, data, seed, dtype, scales_dtype):
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = _int4(gen, n_out, n_in, **q)
    args = [torch.randn(rows, n_in, generator=gen).to(dtype), qweight, qzeros, scales.to(scales_dtype), g_idx,
            q["zero_offset"], torch.randn(n_out, generator=gen).to(dtype) if bias else None]
    _check(ops.gptq_linear_cpu(*_with_views(data, args)), ref.gptq_linear(*args), dtype)


@PROPERTY
@given(rows=st.integers(0, 9), n_in=st.sampled_from([8, 16, 48]),
       outs=st.lists(st.sampled_from([8, 16, 24, 40]), min_size=1, max_size=3), q=int4_settings(),
       bias=st.booleans(), data=st.data(), seed=st.integers(0, 2**16), dtype=st.sampled_from(FLOATS))
def test_gptq_linears(rows, n_in, outs, q, bias, data, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    linears, biases = [], []
    for n_out in outs:
        linears += _int4(gen, n_out, n_in, **q)
        biases.append(torch.randn(n_out, generator=gen).to(dtype) if bias else None)
    x = torch.randn(rows, n_in, generator=gen).to(dtype)
    views = data.draw(views_of([x] + linears + biases))
    got = ops.gptq_linears_cpu(views[0], list(views[1:1 + len(linears)]), list(views[1 + len(linears):]),
                               q["zero_offset"])
    want = [ref.gptq_linear(x, *linears[i:i + 4], q["zero_offset"], biases[i // 4]) for i in range(0, len(linears), 4)]
    _check(got, want, dtype)


# ----------------------------------------------------------------------------------------------- decode ops


@PROPERTY
@given(batch=st.integers(0, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3), length=st.integers(0, 5),
       half=st.sampled_from([1, 3, 8]), cos_batch_one=st.booleans(), data=st.data(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOATS))
def test_rope(batch, kv_heads, group, length, half, cos_batch_one, data, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dim = 2 * half
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    angles = torch.rand(1 if cos_batch_one else batch, length, dim, generator=gen) * 6
    args = [q, k, angles.cos().to(dtype), angles.sin().to(dtype)]
    got = ops.rope_cpu(*_with_views(data, args))
    # Its contract is the eager code's roundings (each product, then the sum), so: bit for bit that code.
    for g, w in zip(got, apply_rotary_pos_emb(*args)):
        assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)


@PROPERTY
@given(rows=st.integers(0, 6), n=st.sampled_from([1, 7, 16, 33]), data=st.data(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOATS))
def test_rms_norm(rows, n, data, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    args = [(torch.randn(rows, n, generator=gen) * 3).to(dtype), torch.randn(n, generator=gen).to(dtype), 1e-6]
    _check(ops.rms_norm_cpu(*_with_views(data, args)), ref.rms_norm(*args), dtype)


@PROPERTY
@given(batch=st.integers(0, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3), length=st.integers(0, 9),
       dim=st.sampled_from([1, 8, 13]), masked=st.booleans(), data=st.data(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOATS))
def test_decode_attention(batch, kv_heads, group, length, dim, masked, data, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, 1, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, length, generator=gen) > 0.3
        mask[..., -1:] = True  # the new token sees itself
    args = [q, k, v, mask, dim**-0.5]
    _check(ops.decode_attention_cpu(*_with_views(data, args)), ref.decode_attention(*args), dtype)


# ----------------------------------------------------------------------------------------------- MoE layers


@st.composite
def moe_cases(draw, int4=False):
    experts = draw(st.integers(1, 5))
    hidden = draw(st.sampled_from([8, 16, 24] if int4 else [3, 8, 16, 24]))
    inter = draw(st.sampled_from([8, 16] if int4 else [5, 8, 16]))
    return dict(experts=experts, top_k=draw(st.integers(1, min(experts, 3))), hidden=hidden, inter=inter,
                shared=draw(st.sampled_from([0, 8, 24] if int4 else [0, 7, 24])), tokens=draw(st.integers(0, 9)),
                x_dtype=draw(st.sampled_from(FLOATS)), w_dtype=draw(st.sampled_from(FLOATS)),
                renormalize=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                q=draw(int4_settings()) if int4 else None)


def _routing(c, gen):
    logits = torch.randn(c["tokens"], c["experts"], generator=gen) * 3
    weights, ids = torch.topk(torch.softmax(logits, -1), c["top_k"], -1)
    return ids, weights.to(c["x_dtype"])


def _dense_args(c, gen):
    e, h, i, s, dt = c["experts"], c["hidden"], c["inter"], c["shared"], c["w_dtype"]
    w = [[_randn(gen, i, h, dtype=dt) for _ in range(e)], [_randn(gen, i, h, dtype=dt) for _ in range(e)],
         [_randn(gen, h, i, dtype=dt) for _ in range(e)]]
    shared = [_randn(gen, s, h, dtype=dt), _randn(gen, s, h, dtype=dt), _randn(gen, h, s, dtype=dt),
              _randn(gen, 1, h, dtype=c["x_dtype"])] if s else [None] * 4
    return w, shared


def _view_lists(data, lists):
    return [data.draw(views_of(items)) for items in lists]


@PROPERTY
@given(c=moe_cases(), data=st.data())
def test_moe_dense(c, data):
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["tokens"], c["hidden"], generator=gen).to(c["x_dtype"])
    ids, weights = _routing(c, gen)
    w, shared = _dense_args(c, gen)
    (vx, vids, vweights), vg, vu, vd, vshared = _view_lists(data, [[x, ids, weights], *w, shared])
    got = ops.moe_ffn_cpu(vx, vids, vweights, list(vg), list(vu), list(vd), *vshared)
    _check(got, ref.moe_ffn(x, ids, weights, *w, *shared), c["x_dtype"])


@pytest.mark.parametrize("hidden, inter, shared", [(64, 1102, 602), (2048, 96, 0), (32, 32, 64)])
@pytest.mark.parametrize("lanes", [True, False])
def test_moe_dense_one_row_per_expert(hidden, inter, shared, lanes):
    """One token, bf16 weights, K a multiple of 32: each routed expert's and the shared expert's jobs are one row, on
    the lanes kernel where the build has it (items of several regions, leftover rows where N % 4), else the stream
    kernels; both against the reference."""
    module = cpu_module()
    c = dict(experts=3, top_k=2, hidden=hidden, inter=inter, shared=shared, tokens=1, x_dtype=torch.bfloat16,
             w_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(hidden + inter + shared)
    x = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    ids, weights = _routing(c, gen)
    w, shared_args = _dense_args(c, gen)
    module.set_dense_row_lanes(lanes)
    try:
        got = ops.moe_ffn_cpu(x, ids, weights, *w, *shared_args)
    finally:
        module.set_dense_row_lanes(True)
    _check(got, ref.moe_ffn(x, ids, weights, *w, *shared_args), torch.bfloat16)


def _int4_args(c, gen):
    e, h, i, s, q = c["experts"], c["hidden"], c["inter"], c["shared"], c["q"]
    experts = []
    for _ in range(e):
        experts += _int4(gen, i, h, **q) + _int4(gen, i, h, **q) + _int4(gen, h, i, **q)
    shared = (_int4(gen, s, h, **q) + _int4(gen, s, h, **q) + _int4(gen, h, s, **q)) if s else []
    in_dtype = lambda ts: [t.to(c["w_dtype"]) if t.dtype.is_floating_point else t for t in ts]  # noqa: E731
    return in_dtype(experts), in_dtype(shared)  # scales in the drawn weight dtype


@PROPERTY
@given(c=moe_cases(int4=True), data=st.data())
def test_moe_int4(c, data):
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["tokens"], c["hidden"], generator=gen).to(c["x_dtype"])
    ids, weights = _routing(c, gen)
    experts, shared = _int4_args(c, gen)
    gate = _randn(gen, 1, c["hidden"], dtype=c["x_dtype"]) if shared else None
    (vx, vids, vweights, vgate), vexperts, vshared = _view_lists(data, [[x, ids, weights, gate], experts, shared])
    zero = c["q"]["zero_offset"]
    got = ops.moe_ffn_int4_cpu(vx, vids, vweights, list(vexperts), list(vshared), vgate, zero)
    _check(got, ref.moe_ffn_int4(x, ids, weights, experts, shared, gate, zero), c["x_dtype"])


@PROPERTY
@given(c=moe_cases(), int4=st.booleans(), data=st.data(), batch=st.sampled_from([None, 1, 3]))
def test_direct_entry_points(c, int4, data, batch):
    """The pybind function the cpu backend's fused lane calls (moe_layer: router, routing, routed and shared
    experts), with its weights in a LayerPack, on random views."""
    if int4:
        c = dict(c, hidden=8 * max(1, c["hidden"] // 8), inter=8 * max(1, c["inter"] // 8),
                 shared=8 * (c["shared"] // 8), q=dict(group=8, sym=False, act_order=c["seed"] % 2 == 1,
                                                        zero_offset=1))
    gen = torch.Generator().manual_seed(c["seed"])
    tokens = c["tokens"] if batch is None else batch * c["tokens"]
    x = torch.randn(tokens, c["hidden"], generator=gen).to(c["x_dtype"])
    router = _randn(gen, c["experts"], c["hidden"], dtype=c["x_dtype"]) * 8
    if int4:
        experts, shared = _int4_args(c, gen)
        tensors = experts + shared
        weights = ref.int4_expert_weights(experts, shared, 1)
    else:
        w, shared_w = _dense_args(c, gen)
        tensors = [t for e in range(c["experts"]) for t in (w[0][e], w[1][e], w[2][e])] + [
            t for t in shared_w[:3] if t is not None]
        weights = (*w, *shared_w[:3])
    gate = _randn(gen, 1, c["hidden"], dtype=c["x_dtype"]) if c["shared"] else None
    (vx, vrouter, vgate), vtensors = _view_lists(data, [[x, router, gate], tensors])
    m = cpu_module()
    pack = m.LayerPack(list(vtensors), c["experts"], int4, 1 if int4 else 0)
    shape = (batch, c["tokens"], c["hidden"]) if batch else x.shape
    out, logits = m.moe_layer(vx.reshape(shape) if batch else vx, vrouter, c["top_k"], c["renormalize"], pack, vgate)
    # Each logit is one dot product: its error is bounded against sum |x_h w_h|, not against the result, which
    # cancellation can make small (one expert's row of logits: -3.95e-3 from terms near 1 gave 4.5e-5 "relative").
    want_logits = (x.float() @ router.float().t()).to(x.dtype)
    assert logits.shape == want_logits.shape and logits.dtype == want_logits.dtype
    bound = ref.TOLERANCE[c["x_dtype"]] * (x.float().abs() @ router.float().abs().t())
    excess = ((logits.float() - want_logits.float()).abs() - bound).max().item() if logits.numel() else 0.0
    assert excess <= 0, f"router logits beyond the dot-product bound by {excess:.2e}"
    # Routed as route() routes the logits it returned (test_routing.py holds the fused routing to route() exactly).
    want = ref.moe_block(x, logits, c["top_k"], c["renormalize"], *weights, gate)
    _check(out.reshape(x.shape), want, c["x_dtype"])


class _Subdict(dict):
    """A dict subclass with its own lookup: dict.get (and the compiled check) must ignore it, as PyTorch's
    containers are plain dicts but a wrapper's need not be."""

    def __getitem__(self, key):
        return "from __getitem__"

    def __missing__(self, key):
        return "from __missing__"


@PROPERTY
@given(n_dicts=st.integers(1, 5), data=st.data())
def test_identity_watch_agrees_with_dict_get(n_dicts, data):
    """IdentityWatch.current() (identity_watch.h) is the Python check `all(d.get(k) is e ...)` over random dicts,
    keys (present or not) and expected objects, before and after random edits: replacing, deleting, adding entries,
    growing a dict until it resizes its table."""
    from qwen2_moe_hf.moe.weights import _same_objects

    objects = [object() for _ in range(4)] + [None, torch.zeros(1), "x"]
    dicts = [data.draw(st.sampled_from([dict, _Subdict]))() for _ in range(n_dicts)]
    names = [f"k{i}" for i in range(6)]
    for d in dicts:
        for name in data.draw(st.lists(st.sampled_from(names), unique=True)):
            d[name] = data.draw(st.sampled_from(objects))
    entries = data.draw(st.lists(st.tuples(st.integers(0, n_dicts - 1), st.sampled_from(names)), max_size=20))
    watched = [dicts[i] for i, _ in entries]
    keys = [k for _, k in entries]
    # Mostly the values they hold now (a current watch), sometimes anything.
    expected = [dict.get(d, k) if data.draw(st.integers(0, 4)) else data.draw(st.sampled_from(objects))
                for d, k in zip(watched, keys)]
    # Dicts that must stay empty (the decode layer's hook dicts): some of the same dicts, some of their own.
    empty = [d for d in dicts if data.draw(st.booleans())] + [{} for _ in range(data.draw(st.integers(0, 2)))]

    def python_check():
        return _same_objects(watched, keys, expected) and not any(empty)

    watch = cpu_module().IdentityWatch(watched, keys, expected, empty)
    assert len(watch) == len(entries)
    assert watch.current() == python_check()
    for _ in range(data.draw(st.integers(0, 4))):
        d = data.draw(st.sampled_from(dicts + empty))
        action, name = data.draw(st.sampled_from(["set", "del", "grow"])), data.draw(st.sampled_from(names))
        if action == "set":
            d[name] = data.draw(st.sampled_from(objects))
        elif action == "del":
            d.pop(name, None)
        else:
            for j in range(40):
                d[f"grown{j}"] = j
        assert watch.current() == python_check(), (action, name)
