"""The cpu backend's whole-layer lane (moe/cpu.py: router, routing and experts in one call to the extension, outside
the dispatcher) against the general path and the torch reference; when it must give way (hooks, wrappers, autograd,
dispatch modes, a backend registered ahead of it); and the watched dicts it relies on to see weight changes."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.moe import Backend, cpu, dispatch, moe_forward_reference, route

import helpers

pytestmark = pytest.mark.skipif(qwen2_moe_hf.env_report()["cpu"] != "available",
                                reason=f"the cpu backend does not run here: {qwen2_moe_hf.env_report()['cpu']}")

# Relative to the largest magnitude (as in test_moe_backends): fp32 sums in another order; bf16 / fp16 are compared
# with the reference run in fp32 on the same rounded weights.
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


def _reference(block, x, logits):
    """The torch reference in fp32 on the block's (rounded) weights, routed from the given logits."""
    ref = copy.deepcopy(block).float()
    weights, ids = route(logits, block.top_k, block.norm_topk_prob)
    flat = x.reshape(-1, x.shape[-1]).float()
    with torch.no_grad():
        return moe_forward_reference(flat, ids, weights.float(), ref.experts, ref.shared_expert,
                                     ref.shared_expert_gate).reshape(x.shape)


def _assert_close(got, want, dtype, what):
    err = helpers.row_error(got, want)
    assert err <= TOL[dtype], f"{what}: per-row relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (1, 40)])
def test_layer_lane_matches_the_reference(dtype, norm, shape):
    block = _block(dtype, seed=3, norm=norm)
    x = torch.randn(*shape, 40).to(dtype)
    with torch.no_grad():
        (out, logits), events = _profiled(lambda: block(x, return_router_logits=True))
    assert LAYER_EVENT in events, "the whole-layer lane did not run"
    assert out.shape == x.shape and out.dtype == dtype and logits.shape == (shape[0] * shape[1], 9)
    # The router's logits are the Linear's, rounded once from fp32 sums (so within one rounding of torch's).
    want_logits = F.linear(x.reshape(-1, 40).float(), block.gate.weight.float())
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), want_logits, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    # The experts ran on the routing those logits give.
    _assert_close(out, _reference(block, x, logits), dtype, f"{dtype} norm={norm} {shape}")


def test_layer_lane_equals_the_general_cpu_path():
    """The lane and the general way (router as a module, then the registered ops) compute the same thing."""
    block = _block(torch.float32, seed=4)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        fast, fast_logits = block(x, return_router_logits=True)
        logits = block.gate(x.reshape(-1, 40))
        general = dispatch.moe_block_forward(x.reshape(-1, 40), logits, block.top_k, block.norm_topk_prob,
                                             block.experts, block.shared_expert, block.shared_expert_gate,
                                             backend="cpu")
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
def test_layer_lane_gives_way(case):
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
    expected_block = copy.deepcopy(block)
    expected_block.config.moe_backend = "torch"
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
    assert LAYER_EVENT not in events, f"{case}: the whole-layer lane ran"
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if case == "hooked_router":  # ours, then the reference copy (deepcopy keeps hooks)
        assert calls == [(12, 9)] * 2
    if case == "dispatch_mode":  # the mode saw the registered op, not an opaque call
        assert any("qwen2_moe_hf.moe_block_cpu" in op for op in log.ops), log.ops
    if case == "autograd":
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_backend_registered_ahead_of_cpu_takes_cpu_inputs():
    """`auto` keeps the registry's order: the lane is the cpu backend's only while it would be chosen anyway."""
    block = _block(torch.float32, seed=6)
    block.config.moe_backend = None
    seen = []

    def spy(hidden_states, topk_ids, topk_weights, experts, shared_expert=None, shared_expert_gate=None):
        seen.append(hidden_states.shape)
        return dispatch.moe_forward_reference(hidden_states, topk_ids, topk_weights, experts, shared_expert,
                                              shared_expert_gate)

    dispatch.register_backend(Backend("spy", spy, lambda: (True, ""), lambda *a: (True, ""), priority=40))
    try:
        with torch.no_grad():
            (out, _), events = _profiled(lambda: block(torch.randn(1, 4, 40), return_router_logits=True))
        assert seen == [(4, 40)] and LAYER_EVENT not in events
    finally:
        dispatch._BACKENDS.pop("spy")
        dispatch.register_backend(dispatch._BACKENDS["torch"])  # re-register one to reset the cached order
    with torch.no_grad():
        _, events = _profiled(lambda: block(torch.randn(1, 4, 40)))
    assert LAYER_EVENT in events


def test_copies_and_pickles_of_a_used_block_are_independent():
    """The cpu backend's per-layer view and watched dicts never leak into copies: each copy computes with its own
    weights, sees its own changes, and pickles as plain modules."""
    block = _block(torch.float32, seed=7)
    x = torch.randn(1, 5, 40)
    with torch.no_grad():
        before = block(x)
        twin = copy.deepcopy(block)
        loaded = pickle.loads(pickle.dumps(block))
        buffer = io.BytesIO()
        torch.save(block, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        for other in (twin, loaded, saved):
            assert all(type(m._parameters) is dict for m in other.modules()), "a watched dict was copied"
            assert other.experts.__dict__.get(cpu._VIEW) is None, "the view was copied"
            torch.testing.assert_close(other(x), before)
        for expert in twin.experts:  # change every expert of the copy: the original must not follow
            expert.up_proj.weight = torch.nn.Parameter(expert.up_proj.weight * 2)
        changed = twin(x)
        torch.testing.assert_close(block(x), before)
    assert (changed - before).abs().max() > 1e-3
    with torch.no_grad():
        expected = copy.deepcopy(twin)
        expected.config.moe_backend = "torch"
        torch.testing.assert_close(changed, expected(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", [
    lambda d: d.__setitem__("w", 1), lambda d: d.__delitem__("a"), lambda d: d.pop("a"), lambda d: d.popitem(),
    lambda d: d.clear(), lambda d: d.update(w=1), lambda d: d.setdefault("w", 1), lambda d: d.__ior__({"w": 1}),
])
def test_watched_dict_counts_every_change(change):
    watched = cpu._WatchedDict(a=1, b=2)
    cells = [[0], [5]]
    watched._cells.extend(cells)
    assert watched["a"] == 1 and "b" in watched and list(watched) == ["a", "b"] and cells == [[0], [5]]
    change(watched)
    assert cells == [[1], [6]]


def test_a_change_rebuilds_only_the_views_of_the_layers_it_touches():
    """Each layer's view is rebuilt after a change to the weights it reads, and only then: a swap in one layer
    leaves the others' views (and their packs) in place; a module two layers share counts for both."""
    blocks = [_block(torch.float32, seed=s) for s in (1, 2, 3)]
    x = torch.randn(1, 4, 40)

    def views():
        with torch.no_grad():
            for block in blocks:
                block(x)
        return [block.experts.__dict__[cpu._VIEW] for block in blocks]

    first = views()
    assert views() == first, "a call without changes rebuilt a view"
    with torch.no_grad():
        blocks[0].experts[2].down_proj.weight = torch.nn.Parameter(blocks[0].experts[2].down_proj.weight * 2)
    second = views()
    assert second[0] is not first[0] and second[1:] == first[1:]
    blocks[2].shared_expert = blocks[1].shared_expert  # now read by layers 1 and 2
    third = views()
    assert third[0] is second[0] and third[1] is second[1] and third[2] is not second[2]
    with torch.no_grad():
        blocks[1].shared_expert.up_proj.weight = torch.nn.Parameter(blocks[1].shared_expert.up_proj.weight * 2)
    fourth = views()
    assert fourth[0] is third[0] and fourth[1] is not third[1] and fourth[2] is not third[2]
    with torch.no_grad():  # and the rebuilt views compute with the new weights
        for block in blocks:
            expected = copy.deepcopy(block)
            expected.config.moe_backend = "torch"
            torch.testing.assert_close(block(x), expected(x), rtol=1e-5, atol=1e-6)


def test_an_in_place_weight_swap_is_read_right_or_refused_by_name():
    """`param.data = ...` changes no dict, so the layer's view keeps the old tensor objects; the op checks each weight
    it reads: a non-contiguous layout is read from a contiguous copy (same result as the reference), a dtype the
    layer's other weights do not share is refused naming the expert."""
    block = _block(torch.float32, seed=8)
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        _, logits = block(x, return_router_logits=True)
        used = int(route(logits, block.top_k, False)[1][0, 0])
        weight = block.experts[used].up_proj.weight
        weight.data = (weight.data * 2).t().contiguous().t()  # new values, not contiguous
        expected = copy.deepcopy(block)
        expected.config.moe_backend = "torch"
        torch.testing.assert_close(block(x), expected(x), rtol=1e-5, atol=1e-6)
        weight.data = weight.data.double()
        with pytest.raises(RuntimeError, match=f"expert {used} up weight must be {torch.float32}"):
            block(x)


def test_a_weight_moved_off_the_cpu_in_place_is_refused_by_name():
    """The direct entry reads raw pointers: a weight it is handed on another device (here the shared expert's
    gate, which is read on every call, on meta) must raise naming it, not be read."""
    block = _block(torch.float32, seed=9)
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        block(x)
        block.shared_expert_gate.weight = torch.nn.Parameter(torch.empty(1, 40, device="meta"))
        with pytest.raises(RuntimeError, match="shared_expert_gate must be on cpu, got a tensor on meta"):
            block(x)
