"""The expert-dispatch ops (kernels/csrc: topk_softmax, moe_align, moe_combine) on CPU, against torch references:
odd sizes, ties in router logits, experts with no tokens, all tokens on one expert. The CUDA versions share these
schemas and contracts (kernels/ops.py)."""

import pytest
import torch

from qwen2_moe_hf.kernels.build import load_cpu_ops
from qwen2_moe_hf.moe.routing import route

import op_reference

OK, WHY = load_cpu_ops()
pytestmark = pytest.mark.skipif(not OK, reason=f"CPU ops unavailable: {WHY}")
ops = torch.ops.qwen2_moe_hf


@pytest.mark.parametrize("tokens, experts, k", [(1, 60, 4), (37, 60, 4), (5, 7, 3), (16, 2, 2), (3, 1, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_matches_route(tokens, experts, k, renormalize):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens * experts))
    weights, ids = ops.topk_softmax(logits, k, renormalize)
    ref_weights, ref_ids = route(logits, k, renormalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights.float(), rtol=1e-6, atol=1e-7)


def test_topk_softmax_ties_go_to_the_lower_expert():
    logits = torch.zeros(3, 60)
    logits[1, [7, 40, 59]] = 2.0  # a tie among the top three
    weights, ids = ops.topk_softmax(logits, 4, False)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [7, 40, 59, 0]
    torch.testing.assert_close(weights[0], torch.full((4,), 1 / 60))


def test_topk_softmax_bf16_logits_and_bad_k():
    logits = torch.randn(4, 9).bfloat16()
    weights, ids = ops.topk_softmax(logits, 2, True)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    with pytest.raises(RuntimeError, match="k=10 must be in"):
        ops.topk_softmax(logits, 10, False)


@pytest.mark.parametrize("case", ["random", "one_expert", "idle_experts", "one_token"])
@pytest.mark.parametrize("block", [1, 4, 16])
def test_moe_align_contract(case, block):
    experts = 9
    gen = torch.Generator().manual_seed(3)
    ids = {
        "random": torch.randint(0, experts, (23, 3), generator=gen),
        "one_expert": torch.full((10, 2), 5),
        "idle_experts": torch.tensor([[0, 8]] * 6),
        "one_token": torch.tensor([[4, 2, 7]]),
    }[case]
    sorted_slots, block_experts, offsets = ops.moe_align(ids, experts, block)
    expected = op_reference.moe_align(ids, experts, block)
    assert torch.equal(sorted_slots, expected[0])
    assert torch.equal(block_experts, expected[1])
    assert torch.equal(offsets, expected[2])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe_align(ids + experts, experts, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_shared", [True, False])
def test_moe_combine_contract(dtype, with_shared):
    tokens, k, hidden = 7, 3, 33
    expert_out = torch.randn(tokens * k, hidden).to(dtype)
    weights = torch.rand(tokens, k)
    shared = torch.randn(tokens, hidden).to(dtype) if with_shared else None
    gate = torch.randn(tokens, 1) if with_shared else None
    got = ops.moe_combine(expert_out, weights, shared, gate)
    ref = (expert_out.float().view(tokens, k, hidden) * weights[..., None]).sum(1)
    if with_shared:
        ref = ref + torch.sigmoid(gate) * shared.float()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                               atol=1e-2 if dtype != torch.float32 else 1e-6)


def test_ops_trace_under_torch_compile():
    """The schemas' fake implementations let torch.compile trace the ops whole (fullgraph), as CUDA graphs need."""
    logits = torch.randn(5, 60)
    expert_out, weights = torch.randn(5 * 4, 16), torch.rand(5, 4)

    def route_and_combine(logits, expert_out, weights):
        w, ids = ops.topk_softmax(logits, 4, True)
        return w, ids, ops.moe_combine(expert_out, weights, None, None)

    compiled = torch.compile(route_and_combine, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(logits, expert_out, weights), route_and_combine(logits, expert_out, weights)):
        assert torch.equal(got, expected)
