"""The cuda backend's Python glue (qwen2_moe_hf/moe/backends/cuda.py: `experts_cuda` around the ops moe_align and
moe_combine, `supports`), tested without a GPU: called with CPU tensors, the ops resolve to their CPU twins
(kernels/csrc/cpu/moe_ops_cpu.cpp, the same schemas and results), so everything but the CUDA kernels themselves runs
here, against the torch reference, per dtype and over odd shapes. Where the CUDA op differs from its twin (moe_align
leaves out-of-range ids out instead of raising), a Python stand-in with the CUDA semantics replaces it."""

import copy

import pytest
import torch

from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.gptq.format import GPTQSpec
from qwen2_moe_hf.gptq.quantize import quantize_linears_
from qwen2_moe_hf.kernels.build import load_cpu_ops
from qwen2_moe_hf.moe import experts_forward_reference
from qwen2_moe_hf.moe.backends import cuda

import helpers

_CPU_OPS = load_cpu_ops()
pytestmark = pytest.mark.skipif(not _CPU_OPS[0], reason=f"the ops' CPU twins are unavailable: {_CPU_OPS[1]}")

# Per row, against the reference in fp32 on the same (rounded) weights: the glue's GEMMs run in the inputs' dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _block(hidden=45, experts=7, top_k=3, inter=37, seed=0):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=experts,
        num_experts_per_tok=top_k, moe_intermediate_size=inter, shared_expert_intermediate_size=16))
    return helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed).eval()


def _routing(tokens, experts, top_k, seed, case="random"):
    gen = torch.Generator().manual_seed(seed)
    if case == "one_expert":
        ids = torch.full((tokens, top_k), experts - 1, dtype=torch.long)
    elif case == "repeated":  # the same expert in several of a token's slots (route() never does; the op may)
        ids = torch.randint(0, experts, (tokens, 1), generator=gen).expand(tokens, top_k).contiguous()
    else:  # k distinct experts per token
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else \
            torch.empty(0, top_k, dtype=torch.long)
    weights = torch.rand(tokens, top_k, generator=gen)
    return ids, weights


def _reference(block, x, ids, weights):
    ref = copy.deepcopy(block).float()
    with torch.no_grad():
        return experts_forward_reference(x.float(), ids, weights.float(), ref.experts)


def _glue(block, x, ids, weights):
    with torch.no_grad():
        return cuda.experts_cuda(x, ids, weights, block.experts.prepared_weights())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 3, 17, 64])
@pytest.mark.parametrize("case", ["random", "one_expert", "repeated"])
def test_glue_matches_reference(dtype, tokens, case):
    block = _block(seed=tokens).to(dtype)
    ids, weights = _routing(tokens, 7, 3, seed=tokens, case=case)
    weights = weights.to(dtype)
    x = torch.randn(tokens, 45).to(dtype)
    got = _glue(block, x, ids, weights)
    assert got.shape == (tokens, 45) and got.dtype == dtype and got.device == x.device
    err = helpers.row_error(got, _reference(block, x, ids, weights))
    assert err <= TOL[dtype], f"{dtype} tokens={tokens} {case}: per-row relative error {err:.2e}"


@pytest.mark.parametrize("experts,top_k,hidden,inter", [(1, 1, 8, 8), (2, 2, 33, 5), (9, 1, 16, 24),
                                                         (4, 4, 40, 31)])
def test_glue_odd_layers(experts, top_k, hidden, inter):
    """One expert, every expert in every token, k=1, odd widths; experts that get no token."""
    block = _block(hidden=hidden, experts=experts, top_k=top_k, inter=inter, seed=experts)
    ids, weights = _routing(5, experts, top_k, seed=experts)
    x = torch.randn(5, hidden)
    err = helpers.row_error(_glue(block, x, ids, weights), _reference(block, x, ids, weights))
    assert err <= TOL[torch.float32], err


def test_glue_takes_any_strides():
    """Non-contiguous inputs (views of larger tensors, transposed ids / weights) give the contiguous result."""
    block = _block()
    ids, weights = _routing(11, 7, 3, seed=4)
    x = torch.randn(11, 90)[:, ::2]
    ids_t, weights_t = ids.t().contiguous().t(), weights.t().contiguous().t()
    assert not (x.is_contiguous() or ids_t.is_contiguous() or weights_t.is_contiguous())
    got = _glue(block, x, ids_t, weights_t)
    torch.testing.assert_close(got, _glue(block, x.contiguous(), ids, weights))
    assert helpers.row_error(got, _reference(block, x, ids, weights)) <= TOL[torch.float32]


def test_backend_entry_is_the_glue():
    """The registered cuda backend computes with this glue (what the tests above exercise)."""
    from qwen2_moe_hf.moe.backends import registry

    assert registry.backend("cuda").experts is cuda.experts_cuda
    assert registry.backend("cuda").supports is cuda.supports


def _align_as_cuda(ids, num_experts, block):
    """moe_align with the CUDA op's semantics where they differ from the CPU twin: ids outside [0, E) are left out
    (the kernel counts only in-range ids and reports nothing). block 1 (the glue's)."""
    assert block == 1
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    kept = torch.arange(flat.numel())[valid]
    order = torch.sort(flat[valid], stable=True).indices
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    sorted_slots = torch.full((flat.numel(),), flat.numel(), dtype=torch.int32)
    sorted_slots[: kept.numel()] = kept[order].int()
    block_experts = torch.full((flat.numel(),), -1, dtype=torch.int32)
    block_experts[: kept.numel()] = flat[valid][order].int()
    return sorted_slots, block_experts, offsets


def test_cuda_align_stand_in_matches_the_twin():
    ids, _ = _routing(13, 7, 3, seed=2)
    for a, b in zip(_align_as_cuda(ids, 7, 1), torch.ops.qwen2_moe_hf.moe_align(ids, 7, 1)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [7, -1, 100])
@pytest.mark.parametrize("align", ["cpu twin", "cuda semantics"])
def test_out_of_range_ids_raise_before_the_gemms(monkeypatch, bad, align):
    """An expert id outside [0, E) raises, naming it, before any expert GEMM runs: the CPU twin raises in
    moe_align; the CUDA op leaves such ids out silently, and the glue sees the missing slots in the group bounds
    it already reads on the host."""
    block = _block()
    ids, weights = _routing(4, 7, 3, seed=1)
    ids[2, 1] = bad
    if align == "cuda semantics":
        monkeypatch.setattr(torch.ops.qwen2_moe_hf, "moe_align", _align_as_cuda)
    calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(cuda.F, "linear", lambda *a: calls.append(1) or real_linear(*a))
    match = "expert id -?[0-9]+ out of range|expert ids out of range \\[0, 7\\)"
    with pytest.raises(RuntimeError, match=match):
        _glue(block, torch.randn(4, 45), ids, weights)
    assert not calls, "an expert GEMM ran before the bad id was reported"


def test_bad_arguments_raise_clear_errors():
    block = _block()
    ids, weights = _routing(4, 7, 3, seed=1)
    x = torch.randn(4, 45)
    with pytest.raises(RuntimeError, match="moe_align: ids must be torch.int64, got torch.int32"):
        _glue(block, x, ids.int(), weights)
    with pytest.raises(RuntimeError, match="moe_combine: expert_out .*"):
        _glue(block, x, ids, weights[:3])
    # Routing weights on another device than the experts' outputs: the op's device check names both.
    with pytest.raises(RuntimeError, match="moe_combine: weights is on meta but expert_out is on cpu"):
        _glue(block, x, ids, weights.to("meta"))


def test_supports_refuses_what_the_glue_cannot_run():
    """What keeps device mixes and other layers away from the glue: the backend's `supports`, asked at resolution
    (a backend named explicitly that does not support the layer raises there, before any op)."""
    block = _block()
    w = block.experts.prepared_weights()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert cuda.supports(w, cpu, torch.float32) == "inputs on cpu, not cuda"
    assert "on cpu, inputs in torch.float32 on cuda" in cuda.supports(w, gpu, torch.float32)
    block16 = copy.deepcopy(block).half()
    assert "expert weights in torch.float16" in cuda.supports(block16.experts.prepared_weights(), gpu, torch.float32)
    names = [f"experts.{e}.{p}" for e in range(7) for p in ("gate_proj", "up_proj", "down_proj")]
    int4 = _block(hidden=40, inter=32)  # GPTQ packs 8 input rows per int32
    quantize_linears_(int4, names, GPTQSpec(bits=4, group_size=-1, sym=True))
    assert "dense only" in cuda.supports(int4.experts.prepared_weights(), gpu, torch.float32)
    wrapped = _block()
    wrapped.experts[0].up_proj = helpers.Scaled(wrapped.experts[0].up_proj)
    assert "wrapped" in cuda.supports(wrapped.experts.prepared_weights(), gpu, torch.float32)
