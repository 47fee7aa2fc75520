"""The cpu backend's fused lane (router, routing and experts in one call to the extension, outside the dispatcher)
against the general way and the torch reference; when it must give way (hooks, wrappers, autograd, dispatch modes,
a backend registered ahead of it); and the experts' prepared weights (moe/weights.py): rebuilt exactly when
something they read is replaced, never shared by copies."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.moe import Backend, register_backend, route, unregister_backend
from qwen2_moe_hf.moe.backends import reference

import helpers

pytestmark = pytest.mark.skipif(qwen2_moe_hf.env_report()["cpu"] != "available",
                                reason=f"the cpu backend does not run here: {qwen2_moe_hf.env_report()['cpu']}")

# Per row: fp32 sums in another order; bf16 / fp16 against the reference run in fp32 on the same rounded weights.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LAYER_EVENT = "qwen2_moe_hf::moe_layer"


def _block(dtype=torch.float32, seed=0, norm=False, hidden=40, experts=9):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=experts,
        num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=norm))
    config.moe_backend = "cpu"
    return helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed).to(dtype).eval()


def _profiled(fn):
    """(fn's result, the names of the profiler's events while it ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


def _assert_close(got, want, dtype, what):
    err = helpers.row_error(got, want)
    assert err <= TOL[dtype], f"{what}: per-row relative error {err:.2e}"


def _torch_copy(block):
    expected = copy.deepcopy(block)  # with its own copy of the config, which its experts share
    expected.config.moe_backend = "torch"
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (1, 40)])
def test_fused_lane_matches_the_reference(dtype, norm, shape):
    block = _block(dtype, seed=3, norm=norm)
    x = torch.randn(*shape, 40).to(dtype)
    with torch.no_grad():
        (out, logits), events = _profiled(lambda: block(x, return_router_logits=True))
    assert LAYER_EVENT in events, "the fused lane did not run"
    assert out.shape == x.shape and out.dtype == dtype and logits.shape == (shape[0] * shape[1], 9)
    # The router's logits are the Linear's, rounded once from fp32 sums (so within one rounding of torch's).
    want_logits = F.linear(x.reshape(-1, 40).float(), block.gate.weight.float())
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), want_logits, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    # The experts ran on the routing those logits give.
    _assert_close(out.reshape(-1, 40), helpers.block_reference(block, x, logits), dtype, f"{dtype} {norm} {shape}")


@pytest.fixture
def native_bf16_rows():
    """Sets the rows from which the CPU op sends bf16 expert GEMMs to oneDNN (0: never), restoring this CPU's
    default after the test. oneDNN's bf16 matmul runs on every x86 CPU (emulated without AVX-512 BF16 / AMX), so
    both paths are tested on any machine."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    yield module.set_native_bf16_rows
    module.set_native_bf16_rows(-1)


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (1, 40)])
def test_bf16_expert_gemms_through_onednn_match_the_reference(rows, shape, native_bf16_rows):
    """rows 0: our widening kernels only; 1: every bf16 job through at::mm (oneDNN: AMX / AVX-512 BF16 where the CPU
    has them); 3: jobs of 3+ rows only (a mixed layer). Fused lane and registered op, odd sizes (hidden 40, 24)."""
    native_bf16_rows(rows)
    block = _block(torch.bfloat16, seed=5)
    x = torch.randn(*shape, 40).to(torch.bfloat16)
    with torch.no_grad():
        (out, logits), events = _profiled(lambda: block(x, return_router_logits=True))
        weights, ids = route(logits, block.top_k, block.norm_topk_prob)
        op = block.experts(x.reshape(-1, 40), ids, weights)
    assert LAYER_EVENT in events
    assert ("aten::mm" in events) == (rows == 1 or (rows == 3 and shape[0] * shape[1] >= 3)), sorted(events)
    _assert_close(out.reshape(-1, 40), helpers.block_reference(block, x, logits), torch.bfloat16, f"{rows} {shape}")
    ref = reference.experts_forward_reference(x.reshape(-1, 40).float(), ids, weights.float(),
                                              copy.deepcopy(block.experts).float())
    _assert_close(op, ref, torch.bfloat16, f"op {rows} {shape}")


def test_native_bf16_rows_default_follows_the_cpu(native_bf16_rows):
    from qwen2_moe_hf.kernels.build import cpu_module

    caps = torch._C._cpu._get_cpu_capability()
    dot = cpu_module().bf16_dot_compiled()  # the vdpbf16ps kernel takes the jobs oneDNN would below 128 rows
    want = 4 if caps.get("amx_bf16") else (128 if dot else 16) if caps.get("avx512_bf16") else 0
    native_bf16_rows(-1)
    assert cpu_module().native_bf16_rows() == want
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        native_bf16_rows(-2)


def test_the_kept_workspace_is_reused_and_released_without_changing_results():
    """The layers' fp32 intermediates live in one buffer kept between calls (the largest so far): a call that
    reuses it, holding a larger call's values, gives bit for bit what it gives on a fresh one; two threads' calls at
    once (one on the kept buffer, one on its own) too; release_workspace lets it go."""
    import threading

    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    block = _block(torch.bfloat16, seed=6)
    xs = [torch.randn(1, t, 40).to(torch.bfloat16) for t in (40, 3, 17, 1)]
    with torch.no_grad():
        fresh = []
        for x in xs:
            module.release_workspace()
            assert module.workspace_bytes() == 0
            fresh.append(block(x))
        module.release_workspace()
        reused = [block(x) for x in xs]
        kept = module.workspace_bytes()
        block(xs[0])
        assert kept > 0 and module.workspace_bytes() == kept  # the 40-token call's, kept through smaller ones
        for got, want in zip(reused, fresh):
            assert torch.equal(got, want)
        results = {}

        def run(i):
            with torch.no_grad():  # grad mode is per thread
                results[i] = [block(xs[(i + j) % len(xs)]) for j in range(20)]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(2):
        for j, got in enumerate(results[i]):
            assert torch.equal(got, fresh[(i + j) % len(xs)]), (i, j)
    module.release_workspace()
    assert module.workspace_bytes() == 0


@pytest.mark.parametrize("hidden,inter", [(0, 8), (16, 0)])
def test_empty_sums_give_zeros(hidden, inter):
    """An empty hidden or intermediate size: every GEMM sums nothing. The op returns zeros of the right shape in
    bf16 with several rows per expert (the vdpbf16ps kernel's jobs where the build has it) and in fp32."""
    experts, tokens = 3, 5
    ids = torch.tensor([[0, 1]] * tokens)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(tokens, hidden).to(dtype)
        weights = torch.full((tokens, 2), 0.5).to(dtype)
        gate = [torch.randn(inter, hidden).to(dtype) for _ in range(experts)]
        up = [torch.randn(inter, hidden).to(dtype) for _ in range(experts)]
        down = [torch.randn(hidden, inter).to(dtype) for _ in range(experts)]
        out = torch.ops.qwen2_moe_hf.moe_ffn_cpu(x, ids, weights, gate, up, down, None, None, None, None)
        assert out.shape == (tokens, hidden) and out.dtype == dtype
        assert torch.equal(out, torch.zeros_like(out))
    # The fused lane with GPTQ-Int4 experts, whose pack keeps each prepared weight: twice, the second call on what
    # the first one kept (a weight with no inputs has no group runs to keep).
    from qwen2_moe_hf.kernels.build import cpu_module

    def int4_linear(k, n):
        groups = max(1, -(-k // 32))
        return [torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32),
                torch.zeros(groups, n // 8, dtype=torch.int32), torch.rand(groups, n).to(torch.bfloat16),
                (torch.arange(k) // 32).to(torch.int32)]

    tensors = [t for _ in range(experts) for k, n in ((hidden, inter), (hidden, inter), (inter, hidden))
               for t in int4_linear(k, n)]
    pack = cpu_module().LayerPack(tensors, experts, True, 1)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    router = torch.randn(experts, hidden).to(torch.bfloat16)
    for _ in range(2):
        out, _ = cpu_module().moe_layer(x, router, 2, False, pack, None)
        assert out.shape == (tokens, hidden) and torch.equal(out, torch.zeros_like(out))


def test_fused_lane_equals_the_general_way():
    """The lane and the general way (router as a module, route(), the registered op, the shared expert as modules)
    compute the same thing."""
    block = _block(torch.float32, seed=4)
    x = torch.randn(3, 5, 40)
    flat = x.reshape(-1, 40)
    with torch.no_grad():
        fast, fast_logits = block(x, return_router_logits=True)
        logits = block.gate(flat)
        weights, ids = route(logits, block.top_k, block.norm_topk_prob)
        general = block.experts(flat, ids, weights)
        general = general + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.reshape(-1, 40), general, rtol=1e-5, atol=1e-6)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["hooked_router", "router_with_bias", "wrapped_router", "autograd",
                                  "dispatch_mode", "torch_backend"])
def test_fused_lane_gives_way(case):
    """Whatever the lane does not take goes the general way, with the same result as the torch backend."""
    block = _block(torch.float32, seed=5)
    x = torch.randn(2, 6, 40)
    calls = []
    if case == "hooked_router":  # a hook must see the router run
        block.gate.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    elif case == "router_with_bias":
        gate = torch.nn.Linear(40, 9, bias=True)
        gate.weight.data.copy_(block.gate.weight)
        block.gate = gate
    elif case == "wrapped_router":
        block.gate = helpers.Scaled(block.gate)
    elif case == "torch_backend":
        block.config.moe_backend = "torch"
    expected_block = _torch_copy(block)
    grad = case == "autograd"
    if grad:
        x.requires_grad_(True)
    log = _OpLog()
    with torch.set_grad_enabled(grad):
        if case == "dispatch_mode":
            with log:
                (out, logits), events = _profiled(lambda: block(x, return_router_logits=True))
        else:
            (out, logits), events = _profiled(lambda: block(x, return_router_logits=True))
        want, want_logits = expected_block(x, return_router_logits=True)
    assert LAYER_EVENT not in events, f"{case}: the fused lane ran"
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if case == "hooked_router":  # ours, then the reference copy (deepcopy keeps hooks)
        assert calls == [(12, 9)] * 2
    if case == "dispatch_mode":  # the mode saw the registered op, not an opaque call
        assert any("qwen2_moe_hf.moe_ffn_cpu" in op for op in log.ops), log.ops
    if case == "autograd":
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


HOOKED = ["experts", "experts.{e}", "experts.{e}.up_proj", "shared_expert", "shared_expert.down_proj",
          "shared_expert_gate"]


@pytest.mark.parametrize("pre", [False, True], ids=["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("target", HOOKED)
def test_hooks_on_the_modules_the_lane_stands_in_for_run(target, pre):
    """A hook on a module the fused lane computes without calling (the experts' container, an expert, one of its
    projections, the shared expert and its gate) runs as the modules' forward would run it, also when registered
    after the weights were prepared; removing it brings the lane back. (The cpu backend named explicitly refuses a
    layer whose experts' modules must run, naming the hooked module.)"""
    block = _block(torch.float32, seed=7)
    block.config.moe_backend = None
    x = torch.randn(1, 6, 40)
    with torch.no_grad():
        (_, logits), events = _profiled(lambda: block(x, return_router_logits=True))
    assert LAYER_EVENT in events
    e = int(route(logits, 3, False)[1][0, 0])  # an expert the first token is routed to
    module = block.get_submodule(target.format(e=e))
    calls = []
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: calls.append(args[0].clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: calls.append(out.clone()))
    if target.startswith("experts."):
        block.config.moe_backend = "cpu"
        with torch.no_grad(), pytest.raises(RuntimeError, match=rf"hooks on {target.format(e=e)}\b"):
            block(x)
        block.config.moe_backend = None
    expected_block = _torch_copy(block)  # the hook is copied with it: the reference's calls come second
    with torch.no_grad():
        out = block(x)
        ours = len(calls)
        want = expected_block(x)
    assert ours > 0 and len(calls) == 2 * ours, f"{target}: {ours} calls, the reference {len(calls) - ours}"
    for got, ref in zip(calls[:ours], calls[ours:]):
        _assert_close(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]), torch.float32, target)
    _assert_close(out.reshape(-1, 40), want.reshape(-1, 40), torch.float32, target)
    handle.remove()
    calls.clear()
    with torch.no_grad():
        again, events = _profiled(lambda: block(x))
    assert LAYER_EVENT in events and not calls, f"{target}: the lane did not come back"
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_global_module_hooks_see_every_expert_call(backend):
    """Global module hooks (torch.nn.modules.module.register_module_forward_hook) see every module a forward calls:
    while one is registered, the experts run through their modules (the reference), even with the cpu backend
    named; removed, the cpu lane runs again."""
    from torch.nn.modules.module import register_module_forward_hook

    block = _block(torch.float32, seed=8)
    block.config.moe_backend = backend
    x = torch.randn(1, 5, 40)
    names = {module: name for name, module in block.named_modules()}
    with torch.no_grad():
        want = _torch_copy(block)(x)
    seen = []
    handle = register_module_forward_hook(lambda m, args, out: seen.append(names.get(m)))
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        handle.remove()
    assert any(n and n.startswith("experts.") and n.endswith("_proj") for n in seen), seen
    assert "shared_expert.down_proj" in seen and "experts" in seen
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        again, events = _profiled(lambda: block(x))
    assert LAYER_EVENT in events
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_a_backend_registered_ahead_of_cpu_takes_cpu_inputs():
    """`auto` keeps the registry's order, and a registration reaches layers that resolved before it."""
    block = _block(torch.float32, seed=6)
    block.config.moe_backend = None
    x = torch.randn(1, 4, 40)
    with torch.no_grad():
        _, events = _profiled(lambda: block(x))
    assert LAYER_EVENT in events
    seen = []

    def spy(hidden_states, top_k_index, top_k_weights, weights):
        seen.append(hidden_states.shape)
        return reference.experts_torch(hidden_states, top_k_index, top_k_weights, weights)

    register_backend(Backend("spy", spy, lambda *a: None, lambda: (True, ""), priority=40))
    try:
        with torch.no_grad():
            _, events = _profiled(lambda: block(x))
        assert seen == [(4, 40)] and LAYER_EVENT not in events
    finally:
        unregister_backend("spy")
    with torch.no_grad():
        _, events = _profiled(lambda: block(x))
    assert LAYER_EVENT in events


def test_copies_and_pickles_of_a_used_block_are_independent():
    """The prepared weights (and the C++ pack they hold) never go into copies: each copy prepares its own, computes
    with its own weights, sees its own changes, and pickles as plain modules."""
    block = _block(torch.float32, seed=7)
    x = torch.randn(1, 5, 40)
    with torch.no_grad():
        before = block(x)
        assert block.experts.__dict__["_prepared"]
        twin = copy.deepcopy(block)
        loaded = pickle.loads(pickle.dumps(block))
        buffer = io.BytesIO()
        torch.save(block, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        for other in (twin, loaded, saved):
            assert all(w is None for w in other.experts.__dict__["_prepared"].values()), "prepared weights copied"
            torch.testing.assert_close(other(x), before)
        for expert in twin.experts:  # change every expert of the copy: the original must not follow
            expert.up_proj.weight = torch.nn.Parameter(expert.up_proj.weight * 2)
        changed = twin(x)
        torch.testing.assert_close(block(x), before)
    assert (changed - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(changed, _torch_copy(twin)(x), rtol=1e-5, atol=1e-6)


def _prepared(block):
    return block.experts.__dict__["_prepared"][id(block.shared_expert)]


def _fresh(shape):
    return torch.nn.Parameter(torch.randn(shape) * 0.1)


# Every way a weight, a module or an expert is replaced or changed: (change, whether the cpu lane still runs).
CHANGES = {
    "new_parameter": (lambda b, e: setattr(b.experts[e].up_proj, "weight", _fresh(b.experts[e].up_proj.weight.shape)),
                      True),
    # accelerate's set_module_tensor_to_device writes the dict directly
    "parameter_dict_entry": (lambda b, e: b.experts[e].up_proj._parameters.__setitem__(
        "weight", _fresh(b.experts[e].up_proj.weight.shape)), True),
    "new_module": (lambda b, e: setattr(b.experts[e], "up_proj", torch.nn.Linear(40, 24, bias=False)), True),
    "new_expert": (lambda b, e: b.experts.__setitem__(e, copy.deepcopy(b.experts[(e + 1) % 9])), True),
    "shared_expert_weight": (lambda b, e: setattr(b.shared_expert.down_proj, "weight",
                                                  _fresh(b.shared_expert.down_proj.weight.shape)), True),
    "in_place_data": (lambda b, e: setattr(b.experts[e].up_proj.weight, "data",
                                           b.experts[e].up_proj.weight.data * 2), True),
    "load_state_dict": (lambda b, e: b.load_state_dict(
        {k: v * 2 if "experts" in k else v for k, v in b.state_dict().items()}), True),
    "load_state_dict_assign": (lambda b, e: b.load_state_dict(
        {k: (v * 2).clone() if "experts" in k else v.clone() for k, v in b.state_dict().items()}, assign=True), True),
    "bias_added": (lambda b, e: setattr(b.experts[e].up_proj, "bias", _fresh(24)), False),
    "wrapped_module": (lambda b, e: setattr(b.experts[e], "up_proj", helpers.Scaled(b.experts[e].up_proj)), False),
    "moved_to_float64": (lambda b, e: b.double(), False),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_reaches_the_next_call(change):
    """The prepared weights are rebuilt when, and only when, something they read is replaced; every kind of change
    reaches the next call (or, where the op cannot run it, hands the call to the reference); never stale weights."""
    block = _block(seed=5)
    block.config.moe_backend = None  # auto: what the op cannot run goes to the reference
    x = torch.randn(1, 6, 40)
    with torch.no_grad():
        before, logits = block(x, return_router_logits=True)
        first = _prepared(block)
        block(x)
        assert _prepared(block) is first, "a call without changes prepared the weights again"
        expert = int(route(logits, 3, False)[1][0, 0])  # an expert that token 0 uses
        CHANGES[change][0](block, expert)
        if change == "moved_to_float64":
            x = x.double()
        after = block(x)
        expected = _torch_copy(block)(x)
    assert helpers.row_error(after, expected) < 2e-5
    if change != "moved_to_float64":  # (the same values, in another dtype)
        assert (after - before).abs().max() > 1e-4, "the change did not matter"
    # `param.data = ...` replaces no object: the same prepared weights read the new data.
    assert (_prepared(block) is not first) == (change != "in_place_data")
    with torch.no_grad():
        assert helpers.resolved_backend(block, x) == ("cpu" if CHANGES[change][1] else "torch")


def test_a_change_rebuilds_only_the_prepared_weights_of_the_layers_it_touches():
    """A swap in one layer leaves the others' prepared weights (and their packs) in place; a module two layers
    share counts for both."""
    blocks = [_block(torch.float32, seed=s) for s in (1, 2, 3)]
    x = torch.randn(1, 4, 40)

    def prepared():
        with torch.no_grad():
            for block in blocks:
                block(x)
        return [_prepared(block) for block in blocks]

    first = prepared()
    assert prepared() == first, "a call without changes prepared again"
    with torch.no_grad():
        blocks[0].experts[2].down_proj.weight = torch.nn.Parameter(blocks[0].experts[2].down_proj.weight * 2)
    second = prepared()
    assert second[0] is not first[0] and second[1:] == first[1:]
    blocks[2].shared_expert = blocks[1].shared_expert  # now read by layers 1 and 2
    third = prepared()
    assert third[0] is second[0] and third[1] is second[1] and third[2] is not second[2]
    with torch.no_grad():
        blocks[1].shared_expert.up_proj.weight = torch.nn.Parameter(blocks[1].shared_expert.up_proj.weight * 2)
    fourth = prepared()
    assert fourth[0] is third[0] and fourth[1] is not third[1] and fourth[2] is not third[2]
    with torch.no_grad():  # and the rebuilt ones compute with the new weights
        for block in blocks:
            torch.testing.assert_close(block(x), _torch_copy(block)(x), rtol=1e-5, atol=1e-6)


def test_an_in_place_weight_swap_is_read_right_or_refused_by_name():
    """`param.data = ...` replaces no object, so the prepared weights (and the C++ pack) keep the same tensor, whose
    data changed: a non-contiguous layout is read from a contiguous copy (same result as the reference), a dtype the
    layer's other weights do not share is refused naming the expert."""
    block = _block(torch.float32, seed=8)
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        _, logits = block(x, return_router_logits=True)
        used = int(route(logits, block.top_k, False)[1][0, 0])
        weight = block.experts[used].up_proj.weight
        weight.data = (weight.data * 2).t().contiguous().t()  # new values, not contiguous
        torch.testing.assert_close(block(x), _torch_copy(block)(x), rtol=1e-5, atol=1e-6)
        weight.data = weight.data.double()
        with pytest.raises(RuntimeError, match=f"expert {used} up weight must be {torch.float32}"):
            block(x)


def test_a_weight_moved_off_the_cpu_in_place_is_refused_by_name():
    """The fused lane reads raw pointers: a weight it is handed on another device (here the shared expert's gate,
    which is read on every call, on meta) must raise naming it, not be read."""
    block = _block(torch.float32, seed=9)
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        block(x)
        block.shared_expert_gate.weight = torch.nn.Parameter(torch.empty(1, 40, device="meta"))
        with pytest.raises(RuntimeError, match="shared_expert_gate must be on cpu, got a tensor on meta"):
            block(x)


def test_accelerate_offload_hooks_reach_the_next_call():
    """accelerate's cpu_offload leaves meta tensors in the modules and writes the real ones into `_parameters` around
    each submodule's forward: the prepared weights must see the meta tensors (and hand the layer to the reference,
    which calls the hooked modules), then, with the hooks removed and the weights back, the cpu lane again."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    from accelerate.hooks import remove_hook_from_submodules

    block = _block(torch.float32, seed=11)
    block.config.moe_backend = None
    x = torch.randn(1, 5, 40)
    with torch.no_grad():
        before = block(x)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        accelerate.cpu_offload(block, execution_device=torch.device("cpu"))
        assert block.experts[0].up_proj.weight.device.type == "meta"
        assert helpers.resolved_backend(block, x) == "torch"
        torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)
        remove_hook_from_submodules(block)
        block.load_state_dict(state, assign=True)
        assert helpers.resolved_backend(block, x) == "cpu"
        torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)


def test_peft_lora_on_the_experts_reaches_the_next_call():
    """PEFT wraps each targeted projection in a LoRA layer: the prepared weights see the new modules (the wrapped
    layers go to the reference, which runs the adapters); merging the adapters back brings the cpu lane with the
    merged weights."""
    peft = pytest.importorskip("peft", reason="peft is not installed (the blog-era stack has it)")

    block = _block(torch.float32, seed=12)
    block.config.moe_backend = None
    x = torch.randn(1, 5, 40)
    with torch.no_grad():
        before = block(x)
        assert helpers.resolved_backend(block, x) == "cpu"
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["up_proj"], init_lora_weights=False),
                                         block)
    model.eval()
    with torch.no_grad():
        assert helpers.resolved_backend(model, x) == "torch"
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-3  # the adapters count
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.merge()
    for mlp in model.experts:
        mlp.up_proj = mlp.up_proj.base_layer  # unwrap the merged layers: plain nn.Linear with merged weights
    with torch.no_grad():
        assert helpers.resolved_backend(model, x) == "cpu"
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
