"""Property tests (hypothesis): random small MoE layers and inputs, every registered optimized backend against the
torch reference (collected everywhere, skipping with the backend's reason where it cannot run; layer and inputs on
the backend's device, the reference on the CPU). The router logits are drawn to produce the awkward cases: ties
(logits from a few integers), experts that get no token, every token on one expert, a single token, and padded
batches (rows of zeros)."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.gptq.format import GPTQSpec
from qwen2_moe_hf.gptq.quantize import quantize_linears_
from qwen2_moe_hf.moe import experts_forward_reference, route

import helpers

BACKENDS = helpers.backend_params()
# The backends that take GPTQ 4-bit experts (the others refuse them when named: docs/dispatch.md).
INT4_BACKENDS = helpers.backend_params(skip={"cuda": "cuda: dense experts only (4-bit experts run on triton, cpu)"})
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def moe_case(draw):
    experts = draw(st.integers(1, 7))
    top_k = draw(st.integers(1, min(experts, 3)))
    hidden = draw(st.sampled_from([8, 16, 24, 40]))
    inter = draw(st.sampled_from([8, 16, 24]))
    tokens = draw(st.integers(1, 9))
    routing = draw(st.sampled_from(["random", "ties", "one_expert", "few_experts"]))
    shared = draw(st.booleans())
    norm = draw(st.booleans())
    padded_rows = draw(st.integers(0, tokens - 1))
    # The last token's activations scaled down: rows of very different sizes, as the per-row error needs to be
    # tested on (under a global max, a wrong small row hides behind the large ones).
    last_row_scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e-6]))
    seed = draw(st.integers(0, 2**16))
    return dict(experts=experts, top_k=top_k, hidden=hidden, inter=inter, tokens=tokens, routing=routing,
                shared=shared, norm=norm, padded_rows=padded_rows, last_row_scale=last_row_scale, seed=seed)


def _layer(case):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=case["hidden"], num_attention_heads=1, num_key_value_heads=1, head_dim=8,
        num_experts=case["experts"], num_experts_per_tok=case["top_k"], moe_intermediate_size=case["inter"],
        shared_expert_intermediate_size=case["inter"] + 8, norm_topk_prob=case["norm"]))
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), case["seed"]).eval()
    if case["routing"] == "ties":  # pairs of identical router rows: the block's own logits tie exactly
        with torch.no_grad():
            block.gate.weight[1::2] = block.gate.weight[0::2][: block.gate.weight[1::2].shape[0]]
    return block


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["tokens"], case["hidden"], generator=gen)
    x[: case["padded_rows"]] = 0  # what padding positions look like after a masked layer
    x[-1] *= case["last_row_scale"]
    e = case["experts"]
    if case["routing"] == "ties":  # few distinct values: many exact ties inside the top-k
        logits = torch.randint(0, 2, (case["tokens"], e), generator=gen).float()
    elif case["routing"] == "one_expert":  # every token's best expert is the same one
        logits = torch.randn(case["tokens"], e, generator=gen)
        logits[:, 0] += 100
    elif case["routing"] == "few_experts":  # most experts get nothing
        logits = torch.full((case["tokens"], e), -50.0)
        logits[:, : case["top_k"]] = torch.randn(case["tokens"], case["top_k"], generator=gen)
    else:
        logits = torch.randn(case["tokens"], e, generator=gen) * 3
    return x, logits


def _check(block, x, logits, case, backend, tol):
    """`block` and `x` on the CPU: the backend runs a copy of them on its device, the reference runs them here."""
    device = helpers.backend_device(backend)
    on_backend = block if device.type == "cpu" else copy.deepcopy(block).to(device)
    on_backend.config.moe_backend = backend
    with torch.no_grad():
        # The routed experts (and the shared one, as modules), routed from the drawn logits.
        weights, ids = route(logits, case["top_k"], case["norm"])
        x_dev, weights_dev, ids_dev = helpers.on_device(device, x, weights, ids)
        got = on_backend.experts(x_dev, ids_dev, weights_dev)
        if case["shared"]:
            got = got + torch.sigmoid(on_backend.shared_expert_gate(x_dev)) * on_backend.shared_expert(x_dev)
        # The whole block, routed by its own router (the fused lane where the backend has one).
        out, block_logits = on_backend(x_dev[None], return_router_logits=True)
        got, out, block_logits = got.cpu(), out.cpu(), block_logits.cpu()
        with helpers.int4_torch_oracle():  # GPTQ experts: the reference must not run the C++ int4 kernels
            want = experts_forward_reference(x, ids, weights, block.experts)
            if case["shared"]:
                want = want + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    err = helpers.row_error(got, want)
    assert torch.isfinite(got).all() and err <= tol, f"{backend}: per-row relative error {err:.2e} for {case}"
    err = helpers.row_error(out[0], helpers.block_reference(block, x, block_logits))
    assert err <= tol, f"{backend} block: per-row relative error {err:.2e} for {case}"
    if case["padded_rows"] and not case["shared"]:
        # A zero row maps to zero through bias-free experts: padding never picks up another token's output.
        assert got[: case["padded_rows"]].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY_SETTINGS
@given(case=moe_case())
# Found by this test in CI: the last row's logits 1e-6 apart rounded to equal probabilities in torch's softmax but
# not in the C++ one, so the fused lane picked other experts than route(); ranking by logit fixed it.
@example(case=dict(experts=7, top_k=2, hidden=8, inter=16, tokens=6, routing="random", shared=False, norm=False,
                   padded_rows=0, last_row_scale=1e-6, seed=2))
def test_backends_match_the_reference(backend, case):
    block = _layer(case)
    x, logits = _inputs(case)
    _check(block, x, logits, case, backend, 2e-5)


@pytest.mark.parametrize("backend", INT4_BACKENDS)
@PROPERTY_SETTINGS
@given(case=moe_case(), group=st.sampled_from([8, -1]), sym=st.booleans())
def test_int4_backends_match_the_reference(backend, case, group, sym):
    block = _layer(case)
    names = [f"experts.{e}.{p}" for e in range(case["experts"]) for p in ("gate_proj", "up_proj", "down_proj")]
    if case["shared"]:
        names += [f"shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    quantize_linears_(block, names, GPTQSpec(bits=4, group_size=group, sym=sym))
    x, logits = _inputs(case)
    _check(block, x, logits, case, backend, 2e-5)
