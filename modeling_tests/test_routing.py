"""Routing from bf16 / fp16 router logits is fp32 routing of those logits: softmax and top-k in float32, weights
rounded once to the logits' dtype at the end. Asserted exactly for every routing implementation (the Python
route(), the topk_softmax op, the fused routing inside the CPU ops and every backend's block), because the
logit-level parity tests cannot tell: routing in bf16 moves bf16 logits by less than their own tolerance."""

import pytest
import torch

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops
from qwen2_moe_hf.moe import route

import helpers
import op_reference as ref

CPU_OPS, WHY = load_cpu_ops()
needs_ops = pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {WHY}")
HALF = [torch.bfloat16, torch.float16]


def _fp32_routing(logits, k, renormalize):
    # The documented rank: larger fp32 logit first (the exact probabilities' order), equal ones by the lower id.
    probs = torch.softmax(logits.float(), -1)
    ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def _logits(dtype, tokens=64, experts=60, seed=0):
    # Spread like a real router's (several units), so bf16 rounding of the probabilities would change weights.
    return (torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_is_fp32_routing(dtype, renormalize):
    logits = _logits(dtype)
    weights, ids = route(logits, 4, renormalize)
    want_weights, want_ids = _fp32_routing(logits, 4, renormalize)
    assert torch.equal(ids, want_ids)
    assert weights.dtype == dtype and torch.equal(weights, want_weights.to(dtype))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_through_the_op_equals_route_in_torch(dtype, renormalize, monkeypatch):
    """On a GPU with the extension built, route() is the topk_softmax op (calls without gradients). Here its CPU
    twin stands in for it: the same ids, the same weights in the logits' dtype (to the op's fp32 exp: 1e-6)."""
    from qwen2_moe_hf.moe import routing

    logits = _logits(dtype)
    want = routing.route_torch(logits, 4, renormalize)
    monkeypatch.setattr(routing, "_op_routes", lambda t: True)
    got = route(logits, 4, renormalize)
    assert torch.equal(got[1], want[1]) and got[0].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-6 if dtype == torch.float32 else None,
                               atol=1e-8 if dtype == torch.float32 else None)


def test_route_takes_the_op_only_on_cuda_and_without_gradients():
    from qwen2_moe_hf.moe import routing

    logits = torch.randn(3, 8)
    assert not routing._op_routes(logits)  # CPU: the torch ops (the fused CPU layer routes on its own)
    assert not routing._op_routes(torch.randn(3, 8, device="meta"))


@needs_ops
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_op_is_fp32_routing(dtype, renormalize):
    logits = _logits(dtype)
    weights, ids = torch.ops.qwen2_moe_hf.topk_softmax(logits, 4, renormalize)
    # Its contract breaks ties by the lower expert id (bf16 logits tie often): the fp32 order with that rule.
    probs = torch.softmax(logits.float(), -1)
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :4]
    want = probs.gather(1, order)
    want = want / want.sum(-1, keepdim=True) if renormalize else want
    assert torch.equal(ids, order) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, want, rtol=1e-6, atol=1e-8)


def _dense_args(hidden=32, inter=16, experts=8, seed=1, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    w = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    return ([w(inter, hidden) for _ in range(experts)], [w(inter, hidden) for _ in range(experts)],
            [w(hidden, inter) for _ in range(experts)], w(24, hidden), w(24, hidden), w(hidden, 24), w(1, hidden))


@needs_ops
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("int4", [False, True])
def test_the_fused_layers_routing_is_route(dtype, renormalize, int4):
    """The cpu backend's fused layer routes inside the op (csrc/cpu/routing.h). Its output must equal, bit for bit,
    the same op given route()'s top-k of the router logits it returned; and route() must be fp32 routing."""
    ops = torch.ops.qwen2_moe_hf
    args = _dense_args(dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=gen).to(dtype)
    router = (torch.randn(8, 32, generator=gen) * 2).to(dtype)
    router[5] = router[2]  # two experts with equal logits for every token: the tie rule decides
    if int4:
        from test_op_boundaries import _int4  # the table's int4 layer maker (gptq.format.quantize_rtn)

        gen4 = torch.Generator().manual_seed(4)
        experts = [t for _ in range(8) for t in _int4(gen4, 16, 32) + _int4(gen4, 16, 32) + _int4(gen4, 32, 16)]
        shared = _int4(gen4, 24, 32) + _int4(gen4, 24, 32) + _int4(gen4, 32, 24)
        pack = cpu_module().LayerPack(experts + shared, 8, True, 1)
        by_ids = lambda ids, w: ops.moe_ffn_int4_cpu(x, ids, w, experts, shared, args[6], 1)  # noqa: E731
    else:
        pack = cpu_module().LayerPack([t for e in range(8) for t in (args[0][e], args[1][e], args[2][e])] +
                                      list(args[3:6]), 8, False, 0)
        by_ids = lambda ids, w: ops.moe_ffn_cpu(x, ids, w, *args)  # noqa: E731
    out, logits = cpu_module().moe_layer(x, router, 3, renormalize, pack, args[6])
    weights, ids = route(logits, 3, renormalize)
    if dtype == torch.float32:
        # No final rounding hides the last ulp of exp(): the op's scalar expf and torch's vectorised one may
        # differ there, so float32 holds to a float32-sized bound (the ids are checked exactly below).
        assert helpers.row_error(out, by_ids(ids, weights)) < 1e-6
    else:
        assert torch.equal(out, by_ids(ids, weights))
    assert (ids == 2).any() and not ((ids == 5).any(-1) & ~(ids == 2).any(-1)).any()  # 2 before 5 on the tie
    want_weights, want_ids = _fp32_routing(logits, 3, renormalize)
    assert torch.equal(weights, want_weights.to(dtype))


BACKENDS = [name for name, state in qwen2_moe_hf.env_report().items() if state == "available"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_every_backends_block_routes_in_fp32(backend, dtype):
    """A bf16 / fp16 block on each backend (the cpu one routes inside its fused op) equals, bit for bit, the same
    backend's computation given fp32 routing of the block's own router logits."""
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(num_experts=8, num_experts_per_tok=3, moe_backend=backend))
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed=6).to(dtype).eval()
    x = torch.randn(2, 30, config.hidden_size, generator=torch.Generator().manual_seed(7)).to(dtype)
    flat = x.reshape(-1, config.hidden_size)
    with torch.no_grad():
        out, logits = block(x, return_router_logits=True)
        weights, ids = _fp32_routing(logits, 3, config.norm_topk_prob)
        weights = weights.to(dtype)
        if helpers.resolved_backend(block, flat) == "cpu":
            # The fused lane: routed and shared experts in one op, summed in fp32 and rounded once.
            mlps = list(block.experts)
            shared = block.shared_expert
            want = torch.ops.qwen2_moe_hf.moe_ffn_cpu(
                flat, ids, weights, [m.gate_proj.weight for m in mlps], [m.up_proj.weight for m in mlps],
                [m.down_proj.weight for m in mlps], shared.gate_proj.weight, shared.up_proj.weight,
                shared.down_proj.weight, block.shared_expert_gate.weight)
        else:
            want = block.experts(flat, ids, weights)
            want = want + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    assert torch.equal(out.reshape(want.shape), want)


def test_bf16_routing_would_be_seen():
    """The premise: on these logits, routing in bf16 (softmax, top-k and renormalisation in the logits' dtype)
    changes the weights, so the tests above can fail; yet by less than bf16 parity's tolerance."""
    logits = _logits(torch.bfloat16)
    weights_bf16 = torch.topk(torch.softmax(logits, -1), 4, -1).values
    weights_bf16 = weights_bf16 / weights_bf16.sum(-1, keepdim=True)
    fp32 = _fp32_routing(logits, 4, True)[0].to(torch.bfloat16)
    assert not torch.equal(weights_bf16, fp32)
    assert ref.row_error(weights_bf16, fp32) < 1e-2


def test_logits_closer_than_the_probabilities_resolve_rank_by_logit():
    """Logits closer than the probabilities' rounding (a row of tiny activations: here 6 distinct logits give 2
    distinct probabilities) are ranked by logit by every routing implementation, not by id or an exp's rounding."""
    logits = torch.tensor([[1e-8, 3e-8, 2e-8, 0.0, 2.5e-8, 3e-8, -1e-8]])
    probs = torch.softmax(logits, -1)
    assert len(set(probs[0].tolist())) < 6  # the premise: distinct logits round to equal probabilities
    want = [[1, 5, 4, 2]]  # by logit; the equal pair 1, 5 by id
    assert route(logits, 4, False)[1].tolist() == want
    assert ref.topk_softmax(logits, 4, False)[1].tolist() == want
    if CPU_OPS:
        assert torch.ops.qwen2_moe_hf.topk_softmax(logits, 4, False)[1].tolist() == want
