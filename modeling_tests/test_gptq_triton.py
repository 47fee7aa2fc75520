"""The 4-bit variants of the Triton kernel family (qwen2_moe_hf/kernels/triton_moe.py: INT4=True) under TRITON_INTERPRET=1 (CPU), fp16 and fp32,
against format.dequantize + torch matmul. Triton's interpreter reads bf16 wrongly (../shared/NOTES.md), so bf16 is
left to the GPU suite. Shapes are tiny: the interpreter runs each program in numpy."""

import os

import pytest
import torch

from helpers import row_error

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no GPU.
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[triton])")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from qwen2_moe_hf.gptq import format as gptq_format  # noqa: E402
from qwen2_moe_hf.kernels import triton_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _rel_err(got, ref):
    return row_error(got, ref)


def _quantized(in_features, out_features, group, gen, sym=True, zero_offset=1, act_order=False, source="rtn",
               scale_dtype=torch.float16):
    """One Linear's GPTQ tensors (qweight, qzeros, scales, g_idx) on DEVICE.

    source "rtn": format.quantize_rtn of a random weight; "random": random nibbles and zeros (every stored zero,
    15 included, which v1 reads as a zero of 16). act_order: the input rows (and their g_idx) shuffled, as a
    desc_act checkpoint stores them."""
    if source == "rtn":
        weight = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
        t = gptq_format.quantize_rtn(weight, 4, group, sym, zero_offset)
        q, g_idx, scales = gptq_format.unpack_rows(t["qweight"], 4), t["g_idx"], t["scales"]
        qzeros = t["qzeros"]
    else:
        size = in_features if group == -1 else group
        groups = -(-in_features // size)
        q = torch.randint(0, 16, (in_features, out_features), generator=gen)
        zeros = torch.randint(0, 16, (groups, out_features), generator=gen)
        qzeros = gptq_format.pack_cols(zeros, 4)
        scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.005).half()
        g_idx = torch.arange(in_features, dtype=torch.int32) // size
    if act_order:
        perm = torch.randperm(in_features, generator=gen)
        q, g_idx = q[perm], g_idx[perm].contiguous()
    tensors = (gptq_format.pack_rows(q, 4), qzeros, scales.to(scale_dtype), g_idx.to(torch.int32))
    return tuple(t.to(DEVICE) for t in tensors)


def _dequant(tensors, zero_offset):
    return gptq_format.dequantize(*tensors, bits=4, zero_offset=zero_offset, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# gptq_linear_triton

# (tokens, source, sym, zero_offset, act_order, bias, scales in x's dtype)
LINEAR_VARIANTS = [
    (1, "rtn", True, 1, False, True, False),
    (3, "rtn", False, 0, True, False, False),
    (17, "random", False, 1, True, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_linear_matches_dequantize(dtype, group):
    # K = 224: a partial K tile (block_k 64) and, for group 64 / 128, a last group shorter than the rest;
    # N = 40: a partial N tile (block_n 32).
    K, N = 224, 40
    gen = torch.Generator().manual_seed(group + 7)
    for tokens, source, sym, zero_offset, act_order, bias, own_scales in LINEAR_VARIANTS:
        tensors = _quantized(K, N, group, gen, sym, zero_offset, act_order, source,
                             scale_dtype=dtype if own_scales else torch.float16)
        x = torch.randn(tokens, K, generator=gen).to(DEVICE, dtype)
        b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
        got = triton_moe.gptq_linear_triton(x, *tensors, bits=4, zero_offset=zero_offset, bias=b, block_n=32,
                                            block_k=64)
        ref = x.float() @ _dequant(tensors, zero_offset).t() + (b.float() if bias else 0)
        assert got.dtype == dtype and got.shape == (tokens, N)
        err = _rel_err(got, ref)
        assert err <= TOL[dtype], f"tokens {tokens}, {source}, sym {sym}, v{2 - zero_offset}: rel error {err:.2e}"


def test_linear_keeps_leading_dims_and_rejects_other_bits():
    gen = torch.Generator().manual_seed(1)
    tensors = _quantized(64, 16, 32, gen)
    x = torch.randn(2, 3, 64, generator=gen).to(DEVICE)
    got = triton_moe.gptq_linear_triton(x, *tensors)
    ref = x.reshape(6, 64) @ _dequant(tensors, 1).t()
    assert got.shape == (2, 3, 16) and _rel_err(got.reshape(6, 16), ref) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="bits"):
        triton_moe.gptq_linear_triton(x, *tensors, bits=8)
    with pytest.raises(ValueError, match="zero_offset"):
        triton_moe.gptq_linear_triton(x, *tensors, zero_offset=2)
    with pytest.raises(ValueError, match="^x: "):
        triton_moe.gptq_linear_triton(x[..., :32], *tensors)
    qweight, qzeros, scales, g_idx = tensors
    with pytest.raises(ValueError, match="^qzeros: "):
        triton_moe.gptq_linear_triton(x, qweight, qzeros[:, :1], scales, g_idx)
    with pytest.raises(ValueError, match="^g_idx: "):
        triton_moe.gptq_linear_triton(x, qweight, qzeros, scales, g_idx.long())


# ---------------------------------------------------------------------------------------------------------------
# routed_experts_int4

def _bank(experts, hidden, inter, group, gen, **kw):
    gate = [_quantized(hidden, inter, group, gen, **kw) for _ in range(experts)]
    up = [_quantized(hidden, inter, group, gen, **kw) for _ in range(experts)]
    down = [_quantized(inter, hidden, group, gen, **kw) for _ in range(experts)]
    return gate, up, down


def _experts_loop(x, ids, weights, gate, up, down, zero_offset):
    """Per-expert torch loop on the dequantized weights, fp32."""
    x = x.float()
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        xe = x[token]
        act = torch.nn.functional.silu(xe @ _dequant(gate[e], zero_offset).t()) * (xe @ _dequant(up[e],
                                                                                            zero_offset).t())
        y = act @ _dequant(down[e], zero_offset).t()
        out.index_add_(0, token, y * weights[token, slot, None].float())
    return out


def _moe_case(tokens, experts, k, hidden, inter, group, dtype, seed, ids=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _bank(experts, hidden, inter, group, gen, **kw)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(DEVICE, dtype)
    return x, ids.to(DEVICE), weights, gate, up, down


def _routed(x, ids, weights, gate, up, down, zero_offset=1, **kw):
    tables = triton_moe.expert_tables(gate, up, down, int4=True, zero_offset=zero_offset)
    return triton_moe.routed_experts(x, ids, weights, tables, **kw)


def _check_moe(case, dtype, zero_offset=1, **kw):
    x, ids, weights, gate, up, down = case
    kw = dict(dict(block_n=32, block_k=32), **kw)
    got = _routed(x, ids, weights, gate, up, down, zero_offset, **kw)
    ref = _experts_loop(x, ids, weights, gate, up, down, zero_offset)
    assert got.dtype == dtype and got.shape == x.shape
    err = _rel_err(got, ref)
    assert err <= TOL[dtype], f"rel error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 17])  # 1 and 3: the decode path; 17: sorted, grouped GEMMs
def test_routed_experts_match_loop(dtype, tokens):
    # Random nibbles, asymmetric zeros, act-order, v1; H = 64 spans two K tiles and two groups of 32.
    case = _moe_case(tokens, experts=5, k=2, hidden=64, inter=32, group=32, dtype=dtype, seed=tokens,
                     source="random", sym=False, act_order=True)
    _check_moe(case, dtype)


@pytest.mark.parametrize("path", ["decode", "sorted"])
@pytest.mark.parametrize("group,sym,zero_offset", [(32, True, 1), (64, False, 0), (128, False, 1), (-1, True, 0)])
def test_routed_experts_groups_and_formats(path, group, sym, zero_offset):
    # fp32 activations with fp16 scales (converted in the kernel); H = 128 so group 128 is one full group and
    # I = 64 is shorter than it (one partial group). 64-wide tiles: a K tile spans two groups of 32.
    dtype = torch.float32
    case = _moe_case(5, experts=4, k=2, hidden=128, inter=64, group=group, dtype=dtype, seed=group % 97,
                     sym=sym, zero_offset=zero_offset, act_order=group != -1)
    _check_moe(case, dtype, zero_offset, decode_max_tokens=64 if path == "decode" else 0, block_n=64, block_k=64)


@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_routed_experts_corner_cases(path):
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    dtype = torch.float32
    # All slots on one expert (both of each token's picks), the other experts idle.
    case = _moe_case(9, experts=4, k=2, hidden=32, inter=32, group=32, dtype=dtype, seed=3,
                     ids=torch.tensor([[2, 2]] * 9))
    _check_moe(case, dtype, **kw)
    # Experts 1 and 2 get no token.
    case = _moe_case(7, experts=4, k=2, hidden=32, inter=32, group=32, dtype=dtype, seed=4,
                     ids=torch.tensor([[0, 3]] * 7))
    _check_moe(case, dtype, **kw)


def test_routed_experts_errors_name_the_argument():
    dtype = torch.float32
    x, ids, weights, gate, up, down = _moe_case(2, experts=3, k=2, hidden=32, inter=32, group=32, dtype=dtype,
                                                seed=7)
    with pytest.raises(ValueError, match="zero_offset"):
        _routed(x, ids, weights, gate, up, down, zero_offset=3)
    with pytest.raises(ValueError, match="^x: "):
        _routed(x[:, :16], ids, weights, gate, up, down)
    with pytest.raises(ValueError, match="^topk_weights: "):
        _routed(x, ids, weights[:, :1], gate, up, down)
    with pytest.raises(ValueError, match=r"^down: 2 experts"):
        _routed(x, ids, weights, gate, up, down[:2])
    bad = list(up)
    bad[1] = bad[1][:2] + (bad[1][2].to(torch.int32), bad[1][3])
    with pytest.raises(ValueError, match=r"^up\[1\]\.scales: "):
        _routed(x, ids, weights, gate, bad, down)
    bad[1] = bad[1][:2] + (bad[1][2].float(), bad[1][3])
    with pytest.raises(ValueError, match=r"^up\[1\]: dtype torch.float32, but gate\[0\]'s is torch.float16"):
        _routed(x, ids, weights, gate, bad, down)
    narrow = [_quantized(32, 16, 32, torch.Generator().manual_seed(8))] * 3  # Linear(32 -> 16), not (32 -> 32)
    with pytest.raises(ValueError, match=r"^down: shapes"):
        _routed(x, ids, weights, gate, up, narrow)
    with pytest.raises(ValueError, match=r"^gate\[2\]: expected a tuple"):
        _routed(x, ids, weights, gate[:2] + [gate[2][:3]], up, down)


def _int4_block():
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    from qwen2_moe_hf.gptq.format import GPTQSpec
    from qwen2_moe_hf.gptq.quantize import quantize_linears_

    torch.manual_seed(0)
    config = Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                            num_experts=5, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2)
    block = Qwen2MoeSparseMoeBlock(config).eval()
    names = [f"experts.{e}.{p}" for e in range(5) for p in ("gate_proj", "up_proj", "down_proj")]
    quantize_linears_(block, names, GPTQSpec(bits=4, group_size=32, sym=False))
    return block


def test_triton_backend_runs_gptq_experts_like_the_reference():
    """The `triton` backend on 4-bit experts, called directly (its availability check wants CUDA; the kernels run
    here under the interpreter): equal to the reference backend; its address table is built once per prepared
    weights and rebuilt when a tensor is given new storage in place."""
    from qwen2_moe_hf.moe import experts_forward_reference, route
    from qwen2_moe_hf.moe.backends.triton import experts_triton

    block = _int4_block()
    x = torch.randn(7, 64)
    weights, ids = route(block.gate(x), 2, False)
    prepared = block.experts.prepared_weights()
    assert prepared.kind == "int4"
    with torch.no_grad():
        got = experts_triton(x, ids, weights, prepared)
        want = experts_forward_reference(x, ids, weights, block.experts)
        assert row_error(got, want) < 1e-4
        tables = prepared.cached("triton.tables", lambda: None)[0]
        assert torch.equal(experts_triton(x, ids, weights, prepared), got)
        assert prepared.cached("triton.tables", lambda: None)[0] is tables  # reused
        # New storage under the same tensor object (`.data = `): the identity check cannot see it, the table's
        # address check must.
        scales = block.experts[3].down_proj.scales
        scales.data = scales.data * 2
        assert block.experts.prepared_weights() is prepared
        got = experts_triton(x, ids, weights, prepared)
        assert prepared.cached("triton.tables", lambda: None)[0] is not tables
        assert row_error(got, experts_forward_reference(x, ids, weights, block.experts)) < 1e-4
