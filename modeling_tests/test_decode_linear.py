"""DecodeLinear and its op: the attention projections and lm_head of an unquantized model (and a GPTQ model's fp16
lm_head) stream their bf16 / fp16 weight through the CPU ops (`dense_linear_cpu`) on a decode step's few rows, and are nn.Linear everywhere else.

The op is held to the torch reference (fp32 sums of the same rounded values) per weight dtype at odd sizes; the
module to nn.Linear's own forward, and to when it must give way (more rows, other dtypes, gradients, compile,
a wrapped or distributed weight); a whole model's decode step to the same step through nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwen2_moe_hf
from qwen2_moe_hf.moe import DecodeLinear, dense

import helpers

pytestmark = pytest.mark.skipif(qwen2_moe_hf.env_report()["cpu"] != "available",
                                reason=f"the CPU ops do not run here: {qwen2_moe_hf.env_report()['cpu']}")

# Per row, against F.linear in fp32 on the same values: fp32 sums in another order, then one rounding.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OP_EVENT = "qwen2_moe_hf::dense_linear_cpu"


def _events(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 67, 100), (3, 1000, 64), (5, 8, 2048), (0, 16, 32), (2, 1, 7)])
def test_dense_linear_op_matches_the_reference(w_dtype, x_dtype, rows, n, k):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, k, generator=gen).to(x_dtype)
    w = torch.randn(n, k, generator=gen).to(w_dtype)
    bias = torch.randn(n, generator=gen).to(w_dtype)
    for b in (None, bias):
        got = torch.ops.qwen2_moe_hf.dense_linear_cpu(x, w, b)
        want = F.linear(x.float(), w.float(), None if b is None else b.float())
        assert got.dtype == x_dtype and got.shape == (rows, n)
        assert helpers.row_error(got, want) <= TOL[x_dtype], helpers.row_error(got, want)


@pytest.mark.parametrize("n", [1, 3, 9, 1001, 4099])
@pytest.mark.parametrize("k", [32, 96, 2048])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_one_row_lanes_kernel_matches_the_reference(n, k, x_dtype, w_dtype):
    """One row against bf16 or fp16 weights with K a multiple of 32 takes the AVX-512 lanes kernel where the build
    has it (rows from 4 regions of each thread's share per pass, and the share's last rows alone): row counts below
    one pass per thread, with leftovers, and many. Its switch off gives the AVX2 stream kernels, the same within
    the same bound."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(x_dtype)
    w = torch.randn(n, k, generator=gen).to(w_dtype)
    want = F.linear(x.float(), w.float())
    try:
        for lanes in (True, False):
            module.set_dense_row_lanes(lanes)
            assert module.dense_row_lanes() == (lanes and module.int4_vnni_compiled())  # the same AVX-512 builds
            got = torch.ops.qwen2_moe_hf.dense_linear_cpu(x, w, None)
            assert got.dtype == x_dtype and got.shape == (1, n)
            assert helpers.row_error(got, want) <= TOL[x_dtype], (lanes, helpers.row_error(got, want))
    finally:
        module.set_dense_row_lanes(True)


@pytest.mark.parametrize("rows", [2, 5, 6, 7, 13, 17, 40])
@pytest.mark.parametrize("n,k", [(1, 7), (3, 40), (4, 32), (5, 96), (67, 2048), (130, 33)])
def test_bf16_dot_kernel_matches_the_reference(rows, n, k):
    """Several bf16 rows against bf16 weights take the vdpbf16ps kernel where the build has it (bf16_dot.h): 6-row
    tiles and their 1-5-row tails, 4-weight-row groups and their 1-3-row tails, K with and without a part of 32,
    items of 64 weight rows. Each element is the fp32 sum of the exact products, rounded once to bf16: within half
    a bf16 step of the exact sum plus fp32's summation error. Its switch off gives the other kernels, held to the
    same bound."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    want = F.linear(x.double(), w.double())
    bound = 2.0 ** -8 * want.abs() + 2.0 ** -20 * F.linear(x.double().abs(), w.double().abs())
    try:
        for dot in (True, False):
            module.set_bf16_dot(dot)
            assert module.bf16_dot() == (dot and module.bf16_dot_compiled())
            got = torch.ops.qwen2_moe_hf.dense_linear_cpu(x, w, None)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            excess = ((got.double() - want).abs() - bound).max().item()
            assert excess <= 0, (dot, excess)
    finally:
        module.set_bf16_dot(True)


def _layer(n=96, k=64, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layer = DecodeLinear(k, n, bias=bias).to(dtype).eval()
    return layer


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 1, 64), (4, 64), (64,), (1, 48)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_rows_take_the_op_and_match_nn_linear(shape, dtype):
    """bf16: up to 4 rows; fp16: one row with K a multiple of 32, where the AVX-512 lanes kernel is on."""
    from qwen2_moe_hf.kernels.build import cpu_module

    layer = _layer(k=shape[-1], dtype=dtype)
    x = torch.randn(*shape).to(dtype)
    one_row = x.numel() == shape[-1]
    try:
        for lanes in (True, False):
            cpu_module().set_dense_row_lanes(lanes)
            with torch.no_grad():
                _, events = _events(lambda: layer(x))
            takes_op = dtype == torch.bfloat16 or (one_row and shape[-1] % 32 == 0 and cpu_module().dense_row_lanes())
            assert (OP_EVENT in events) == takes_op, (lanes, events)
    finally:
        cpu_module().set_dense_row_lanes(True)
    with torch.no_grad():
        got = layer(x)
        want = nn.Linear.forward(layer, x)
    assert got.shape == want.shape and got.dtype == dtype
    assert helpers.row_error(got, F.linear(x.float(), layer.weight.float(), layer.bias.float())) <= TOL[dtype]
    assert helpers.row_error(got, want) <= 2 * TOL[dtype]


def test_everything_else_is_nn_linear():
    layer = _layer()
    x = torch.randn(1, 64).bfloat16()
    cases = {
        "5 rows": (lambda: layer(torch.randn(5, 64).bfloat16()), True),
        "fp32 input": (lambda: _layer(dtype=torch.float32)(x.float()), True),
        "gradients": (lambda: layer(x), False),  # grad mode on, the weight requires grad
    }
    for name, (fn, no_grad) in cases.items():
        with torch.set_grad_enabled(not no_grad):
            _, events = _events(fn)
        assert OP_EVENT not in events, name
        layer = _layer()
    with torch.no_grad(), pytest.raises(RuntimeError) as mixed:  # an fp16 x on bf16 weights: nn.Linear's own error
        layer(x.half())
    assert "dense_linear_cpu" not in str(mixed.value)
    # A weight that is not a plain tensor (a subclass, as DTensor is) goes to nn.Linear, which dispatches it.
    class Tagged(torch.Tensor):
        pass

    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Tagged), requires_grad=False)
    with torch.no_grad():
        _, events = _events(lambda: layer(x))
    assert OP_EVENT not in events


def test_compiled_layer_uses_nn_linear():
    layer = _layer()
    x = torch.randn(1, 64).bfloat16()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    assert helpers.row_error(got, nn.Linear.forward(layer, x)) <= 2 * TOL[torch.bfloat16]


def test_state_dict_and_hooks_are_nn_linear_ones():
    layer = _layer()
    plain = nn.Linear(64, 96).bfloat16()
    assert set(layer.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        layer(torch.randn(1, 64).bfloat16())
    assert seen == [torch.Size([1, 96])]


def test_a_bf16_models_decode_step_matches_nn_linear(monkeypatch):
    """Attention projections and lm_head are DecodeLinear; one decode step after a prompt gives the logits the
    same model gives with the op switched off (nn.Linear's forward everywhere)."""
    model = helpers.build_model("gqa").to(torch.bfloat16)
    assert type(model.lm_head) is DecodeLinear and type(model.model.layers[0].self_attn.q_proj) is DecodeLinear
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])

    def step():
        with torch.no_grad():
            out = model(ids[:, :-1], use_cache=True)
            return model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits

    fast, events = _events(step)
    assert OP_EVENT in events
    monkeypatch.setattr(dense, "load_cpu_ops", lambda: (False, "switched off by the test"))
    slow, events = _events(step)
    assert OP_EVENT not in events
    assert helpers.row_error(fast, slow) <= 3e-2
