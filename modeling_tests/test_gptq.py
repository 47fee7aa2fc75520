"""GPTQ-Int4: the format, the int4 kernels against the dequantized reference (and against auto-gptq where it is
installed: the blog-era stack), checkpoints written by our RTN writer loaded through from_pretrained on every
stack, the faults that must raise, and proof that transformers' own GPTQ quantizer never runs for our model."""

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
import transformers.modeling_utils
from transformers import AutoModelForCausalLM

import qwen2_moe_hf
from qwen2_moe_hf import compat
from qwen2_moe_hf.files import CheckpointError
from qwen2_moe_hf.gptq import format as gptq_format
from qwen2_moe_hf.gptq.format import GPTQFormatError, GPTQSpec
from qwen2_moe_hf.gptq.linear import GPTQLinear
from qwen2_moe_hf.gptq.quantize import quantize_checkpoint, quantize_linears_
from qwen2_moe_hf.kernels.build import load_cpu_ops
from qwen2_moe_hf.moe import DecodeLinear

import helpers
from helpers import build_model, int4_torch_oracle, row_error, save_checkpoint

CPU_OPS, CPU_OPS_WHY = load_cpu_ops()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rel(a, b):
    return row_error(a, b)


def load(path, **kwargs):
    dtype = kwargs.pop("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwarg(dtype), **kwargs)


def dequantized_twin(model):
    """A plain full-precision model with the GPTQ model's weights: every GPTQLinear dequantized to fp32."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    twin = Qwen2MoeForCausalLM(config).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, GPTQLinear):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx") and name not in state:
            state[name] = tensor.float()
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    """A tiny full-precision checkpoint with dense-MLP layers too (mlp_only_layers [0, 2])."""
    path = tmp_path_factory.mktemp("fp")
    return save_checkpoint(build_model("mlp_only_mqa_norm", seed=3), str(path))


@pytest.fixture(scope="module")
def gptq_checkpoint(fp_checkpoint, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("gptq"))
    return quantize_checkpoint(fp_checkpoint, dst, bits=4, group_size=32, sym=True, max_shard_size="150KB",
                               progress=False)


# --------------------------------------------------------------------------------------------- format


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    per_int = 32 // bits
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (rows * per_int, cols * per_int), generator=gen, dtype=torch.int32)
    assert torch.equal(gptq_format.unpack_rows(gptq_format.pack_rows(values, bits), bits), values)
    assert torch.equal(gptq_format.unpack_cols(gptq_format.pack_cols(values, bits), bits), values)
    # The top field set must still round-trip through int32's sign bit.
    full = torch.full((per_int, per_int), 2**bits - 1, dtype=torch.int32)
    assert torch.equal(gptq_format.unpack_rows(gptq_format.pack_rows(full, bits), bits), full)


def within_half_a_step(deq, weight, scales, g_idx):
    """Every element of deq [N, K] within half a quantization step of weight (fp32 division's rounding aside)."""
    step = scales.float()[g_idx.long()].t()  # [N, K]
    excess = (deq - weight).abs() - (0.5 * step + weight.abs() * 1e-6 + 1e-9)
    return excess.max().item() <= 0, excess.max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("zero_offset", [1, 0])
@pytest.mark.parametrize("values", ["normal", "positive", "negative", "with_zero_group"])
def test_rtn_error_is_within_half_a_step(bits, sym, group_size, zero_offset, values):
    """Every weight, not 99% of them: a group whose zero sits at the format's bound (all-positive weights in the v1
    format, whose zeros are >= 1), the fp16 rounding of the scale and all-zero groups included."""
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits + zero_offset))
    if values == "positive":
        weight = weight.abs()
    elif values == "negative":
        weight = -weight.abs()
    elif values == "with_zero_group":
        weight[:, :32] = 0
    packed = gptq_format.quantize_rtn(weight, bits, group_size, sym, zero_offset)
    deq = gptq_format.dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                                 zero_offset, torch.float32)
    ok, excess = within_half_a_step(deq, weight, packed["scales"], packed["g_idx"])
    assert ok and torch.isfinite(packed["scales"].float()).all(), f"a weight is {excess:.2e} past half a step"


def _pack_nibbles(values, along_rows):
    """A plain-Python packer, independent of format.pack_rows / pack_cols: 8 four-bit values per int32, the first
    in the lowest bits, along rows (qweight) or columns (qzeros)."""
    rows, cols = values.shape
    out = []
    if along_rows:
        for r in range(0, rows, 8):
            out.append([sum(int(values[r + j, c]) << (4 * j) for j in range(8)) for c in range(cols)])
    else:
        for r in range(rows):
            out.append([sum(int(values[r, c + j]) << (4 * j) for j in range(8)) for c in range(0, cols, 8)])
    return torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in out], dtype=torch.int32)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_the_zero_offset_of_each_format_is_pinned(fmt, tmp_path):
    """v1 ("gptq") stores zero - 1, v2 stores the zero itself (AutoGPTQ / GPTQModel). Tensors packed by hand here,
    from known integers, must dequantize to scale * (q - zero) through format.dequantize, the CPU op and a
    checkpoint loaded with that checkpoint_format: a writer and reader that shared one wrong offset table would
    fail here."""
    k, n, group = 32, 16, 16
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zero = torch.randint(1, 16, (k // group, n), generator=gen)  # 1..15: representable in both formats
    scales = (torch.rand(k // group, n, generator=gen) * 0.1 + 0.01).half()
    g_idx = torch.arange(k, dtype=torch.int32) // group
    expected = (scales.float()[g_idx.long()] * (q - zero[g_idx.long()]).float()).t()  # [N, K]
    stored_zero = zero - 1 if fmt == "gptq" else zero
    tensors = {"qweight": _pack_nibbles(q, True), "qzeros": _pack_nibbles(stored_zero, False), "scales": scales,
               "g_idx": g_idx}
    spec = GPTQSpec(bits=4, group_size=group, checkpoint_format=fmt)
    assert spec.zero_offset == (1 if fmt == "gptq" else 0)
    assert torch.equal(gptq_format.dequantize(*tensors.values(), 4, spec.zero_offset, torch.float32), expected)
    layer = GPTQLinear(k, n, False, spec)
    for part, value in tensors.items():
        layer._buffers[part] = value
    x = torch.randn(3, k, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-6)  # the CPU op where built
    # And through a checkpoint that says which format it is in.
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM

    import helpers

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                                         num_hidden_layers=1, num_experts=2, moe_intermediate_size=16,
                                                         shared_expert_intermediate_size=16, intermediate_size=16))
    model = Qwen2MoeForCausalLM(config)
    state = {k_: v.contiguous() for k_, v in model.state_dict().items()}
    prefix = "model.layers.0.mlp.experts.1.up_proj"
    del state[f"{prefix}.weight"]
    state.update({f"{prefix}.{part}": value for part, value in tensors.items()})
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": True,
                                  "desc_act": False, "checkpoint_format": fmt}
    config.save_pretrained(str(tmp_path))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load(str(tmp_path)).model.layers[0].mlp.experts[1].up_proj
    assert isinstance(loaded, GPTQLinear) and torch.equal(loaded.dequantize(torch.float32), expected)


# --------------------------------------------------------------------------------------------- int4 kernel


def _random_layer(k, n, group_size, sym, zero_offset, act_order, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = GPTQSpec(bits=4, group_size=group_size, sym=sym, checkpoint_format="gptq" if zero_offset else "gptq_v2")
    size = k if group_size == -1 else group_size
    g_idx = (torch.randperm(k, generator=gen) // size) if act_order else None
    packed = gptq_format.quantize_rtn(torch.randn(n, k, generator=gen), 4, group_size, sym, zero_offset, g_idx)
    layer = GPTQLinear(k, n, bias, spec)
    for part, value in packed.items():
        layer._buffers[part] = value
    if bias:
        layer._buffers["bias"] = torch.randn(n, generator=gen).half()
    return layer


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym,zero_offset,act_order", [(True, 1, False), (False, 0, False), (False, 1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int4_linear_matches_dequantized(group_size, sym, zero_offset, act_order, dtype, monkeypatch):
    layer = _random_layer(256, 72, group_size, sym, zero_offset, act_order, bias=group_size == 64)
    for tokens in (1, 3, 17, 520):  # 2, 6, 34 and 1040 rows: each of the kernel's paths (int4_gemm.h)
        x = torch.randn(2, tokens, 256).to(dtype)
        with torch.no_grad():
            got = layer(x)
            monkeypatch.setenv("QWEN2_MOE_HF_GPTQ_KERNEL", "torch")
            want = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32),
                                              None if layer.bias is None else layer.bias.float())
            monkeypatch.delenv("QWEN2_MOE_HF_GPTQ_KERNEL")
        assert got.dtype == dtype and got.shape == (2, tokens, 72)
        assert rel(got, want) < TOL[dtype], (tokens, rel(got, want))


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("blocked", [False, True])
def test_the_int4_epilogue_adds_the_bias_in_fp32_and_rounds_once(blocked):
    """The CPU int4 Linear's epilogue (plain loops, not ATen's add_ and to): fp32 sums + the bias as fp32, rounded
    once to x's dtype. fp32 x shows the sums themselves: with a bias of any dtype the output is exactly the
    bias-free output + bias.float(); for bf16 / fp16 x, a bias of the same values in another dtype or a strided
    view, and x as a strided view, give the same bits. 1 row (q/k/v in one region, o alone), 3 rows and 600 rows
    (the epilogue's parallel loop)."""
    widths = (192, 64) if blocked else (72, 64)
    layers = [_random_layer(256, n, 64, False, 1, False, bias=False, seed=n) for n in widths]
    if blocked:
        assert all(layer.use_blocked_layout() for layer in layers)
    ops = torch.ops.qwen2_moe_hf
    gen = torch.Generator().manual_seed(7)

    def one(x, layer, bias):
        return ops.gptq_linear_cpu(x, *layer.tensors(), 1, bias)

    def both(x, biases):
        return ops.gptq_linears_cpu(x, [t for layer in layers for t in layer.tensors()], biases, 1)

    for rows in (1, 3, 600):
        for bias_dtype in (torch.float32, torch.bfloat16, torch.float16):
            # a strided view of the same values: every other element of a tensor twice as long
            spread = [(torch.randn(2 * layer.out_features, generator=gen) * 4).to(bias_dtype) for layer in layers]
            strided = [b[::2] for b in spread]
            dense = [b.contiguous() for b in strided]
            x = torch.randn(rows, 256, generator=gen)
            for i, layer in enumerate(layers):
                plain = one(x, layer, None)
                got = one(x, layer, strided[i])
                assert torch.equal(got, plain + dense[i].float()), (rows, bias_dtype)
                assert torch.equal(one(x, layer, dense[i]), got)
            assert all(torch.equal(g, one(x, layer, b)) for g, layer, b in zip(both(x, strided), layers, dense))
            for dtype in (torch.bfloat16, torch.float16):
                xd = x.to(dtype)
                x_strided = xd.t().contiguous().t()  # the same values, strides (1, rows)
                assert not x_strided.is_contiguous() or rows == 1
                for i, layer in enumerate(layers):
                    want = one(xd, layer, dense[i].float())
                    assert torch.equal(one(xd, layer, dense[i]), want), (rows, bias_dtype, dtype)
                    assert torch.equal(one(x_strided, layer, strided[i]), want)
                    assert torch.equal(one(xd, layer, None), one(x_strided, layer, None))
                fused = both(x_strided, strided)
                assert all(torch.equal(f, one(xd, layer, b)) for f, layer, b in zip(fused, layers, dense))
        # bf16 x: the sums are not at hand (the VNNI path quantizes x), but their error is far below bf16's
        # rounding, so rounding once to bf16 lands on the fp32 reference's rounding almost everywhere, and
        # rounding the sums first, then the sum with the bias, visibly less often.
        if rows == 600:
            xd, layer, b = x.bfloat16(), layers[0], dense[0].float() / 4
            exact = torch.nn.functional.linear(xd.float(), layer.dequantize(torch.float32))
            once, twice = (exact + b).bfloat16(), (exact.bfloat16().float() + b).bfloat16()
            assert (twice == once).float().mean() < 0.85  # the check below tells the two apart
            assert (one(xd, layer, b) == once).float().mean() > 0.93


@pytest.fixture
def native_int4_rows():
    """Sets the rows from which the CPU int4 GEMM dequantizes to bf16 and hands the product to oneDNN (0: never),
    restoring this CPU's default after the test (oneDNN's bf16 matmul runs on any x86 CPU, emulated without
    AVX-512 BF16 / AMX)."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    yield module.set_native_int4_rows
    module.set_native_int4_rows(-1)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("rows", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int4_through_onednn_matches_dequantized(rows, dtype, native_int4_rows):
    """The oneDNN path (W dequantized, rounded to bf16, at::mm) takes bf16 activations only: fp32 and fp16 inputs
    keep our kernels whatever the setting (rounding them to bf16 would cost their precision). Act-order g_idx and
    an odd out-features count included."""
    native_int4_rows(rows)
    layer = _random_layer(256, 72, 64, False, 1, True, bias=True)
    for tokens in (1, 3, 17):
        x = torch.randn(2, tokens, 256).to(dtype)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = layer(x)
        want = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())
        onednn = "aten::mm" in {e.name for e in prof.events()}
        assert onednn == (dtype == torch.bfloat16 and rows > 0 and 2 * tokens >= rows), (tokens, onednn)
        assert got.dtype == dtype and rel(got, want) < TOL[dtype], (tokens, rel(got, want))


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("group_size,zero_offset,act_order", [(32, 1, False), (128, 0, False), (-1, 1, False),
                                                              (32, 1, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_int4_vnni_matches_dequantized(group_size, zero_offset, act_order, dtype):
    """bf16 and fp16 activations, 1-40 rows: on an AVX-512 VNNI build the int4 GEMM quantizes x to int8 per group
    run and uses integer dot products (int4_vnni.h) at every row count; within the dtype's bound of every GPTQ path
    (for fp16 the auto-gptq contract's), NaN rows stay NaN, and the float paths (switched back on here: 1-4 rows a
    pass, tiles) still agree. fp32 activations and act-order weights (no group runs) never take it."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    layer = _random_layer(256, 72, group_size, False, zero_offset, act_order, bias=False)  # 72 = 4 x 16 + 8 columns
    try:
        for tokens in (1, 3, 7, 8, 13, 40):  # one row; a tile of 8 rows, ones and a last short one
            x = torch.randn(tokens, 256).to(dtype)
            x[min(1, tokens - 1), 7] = float("nan") if tokens == 3 else x[0, 7]
            want = torch.nn.functional.linear(x.double(), layer.dequantize(torch.float32).double())
            got = {}
            for vnni in (True, False):
                module.set_int4_vnni(vnni)
                with torch.no_grad():
                    got[vnni] = layer(x)
            for y in got.values():
                finite = torch.isfinite(want).all(1)
                assert y.dtype == dtype and torch.equal(torch.isnan(y).all(1), ~finite), tokens
                assert rel(y[finite].double(), want[finite]) < TOL[dtype], (tokens, rel(y[finite].double(), want[finite]))
            if dtype != torch.float32:  # the two paths differ by less than the dtype's own rounding of the output
                finite = torch.isfinite(want).all(1)
                own_rounding = rel(want[finite].to(dtype).double(), want[finite])
                assert rel(got[True][finite].double(), want[finite]) < 1.5 * own_rounding + 1e-6, tokens
            module.set_int4_vnni(True)
            path = module.int4_path(tokens, 256, not act_order, str(dtype).removeprefix("torch."))
            float_path = "rows" if tokens < 16 else "tiles"
            vnni_taken = module.int4_vnni_compiled() and not act_order and dtype != torch.float32
            assert path == ("vnni" if vnni_taken else float_path), (tokens, path)
    finally:
        module.set_int4_vnni(True)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("group_size,zero_offset", [(32, 1), (128, 0), (-1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [8, 72, 1000])
def test_cpu_int4_one_row_is_bitwise_that_row_among_others(group_size, zero_offset, dtype, n):
    """A decode row (M = 1) takes its own kernel on VNNI builds (grouped_vnni_row: sums in registers, blocks of 64
    columns); it must give bit for bit what the multi-row kernels give that row beside others (VNNI: a tile of 8
    rows and a last one of 3; float: 4 rows a pass), at column counts that end inside a 16-column vector and inside
    a 64-column block, and with its switch off."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    layer = _random_layer(256, n, group_size, False, zero_offset, False, bias=False, seed=n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 256, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            together = layer(x)
            for row_kernel in (True, False):
                module.set_int4_vnni_row(row_kernel)
                for m in (0, 7, 8, 10):
                    alone = layer(x[m:m + 1])
                    assert torch.equal(alone[0], together[m]), (row_kernel, m, (alone[0] - together[m]).abs().max())
    finally:
        module.set_int4_vnni_row(True)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("group_size,act_order", [(32, False), (128, False), (-1, False), (64, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int4_blocked_layout_is_bitwise_the_checkpoint_layout(group_size, act_order, dtype, native_int4_rows):
    """The blocked qweight [N/64, K/8, 64] is the same words in another order: every path of the int4 GEMM (1-4
    rows a pass, the one-row VNNI kernel and the float one, tiles, sgemm, oneDNN for bf16) gives bit for bit what it
    gives on the checkpoint layout, at 5 column blocks (slices of 64 per thread: the one-row VNNI kernel takes two
    blocks at a time on the blocked layout, then the last one alone) and against the dequantized reference."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    layer = _random_layer(256, 320, group_size, False, 1, act_order, bias=True, seed=group_size)
    blocked = copy.deepcopy(layer)
    assert blocked.use_blocked_layout() and blocked.blocked and blocked.qweight.shape == (5, 32, 64)
    assert torch.equal(blocked.checkpoint_qweight(), layer.qweight)
    gen = torch.Generator().manual_seed(2)
    try:
        for native, vnni in ((0, True), (0, False), (5, True)):
            native_int4_rows(native)
            module.set_int4_vnni(vnni)
            for tokens in (1, 2, 3, 5, 17, 40, 1030):
                x = torch.randn(tokens, 256, generator=gen).to(dtype)
                with torch.no_grad():
                    got, want = blocked(x), layer(x)
                assert torch.equal(got, want), (native, vnni, tokens, (got.float() - want.float()).abs().max())
                ref = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())
                assert rel(got, ref) < TOL[dtype], (native, vnni, tokens, rel(got, ref))
    finally:
        module.set_int4_vnni(True)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [False, True])
def test_projections_in_one_call_are_bitwise_each_layer(dtype, blocked):
    """fused_projections (q, k, v in one gptq_linears_cpu call; a decode row on the VNNI path walks the three
    weights in one parallel region, each thread a slice across them) gives bit for bit what each GPTQLinear gives
    alone, at 1 row (the one region), 3 and 40 rows, with and without biases, in both qweight layouts, with the
    VNNI row kernel on and off; the fake knows the outputs' shapes."""
    from qwen2_moe_hf.kernels.build import cpu_module
    from qwen2_moe_hf.moe import fused_projections

    layers = [_random_layer(256, n, 64, False, 1, False, bias=bias, seed=n)
              for n, bias in ((192, True), (64, True), (128, False))]
    if blocked:
        assert all(layer.use_blocked_layout() for layer in layers)
    module = cpu_module()
    gen = torch.Generator().manual_seed(3)
    try:
        for row_kernel in (True, False):
            module.set_int4_vnni_row(row_kernel)
            for tokens in (1, 3, 40):
                x = torch.randn(1, tokens, 256, generator=gen).to(dtype)
                with torch.no_grad():
                    got = fused_projections(x, layers)
                    want = [layer(x) for layer in layers]
                assert got is not None and len(got) == 3
                for g, w in zip(got, want):
                    assert g.shape == w.shape and torch.equal(g, w), (row_kernel, tokens, (g - w).abs().max())
    finally:
        module.set_int4_vnni_row(True)
    x = torch.randn(5, 256, device="meta")
    fake = torch.ops.qwen2_moe_hf.gptq_linears_cpu(
        x, [t.to("meta") for layer in layers for t in layer.tensors()],
        [None if layer.bias is None else layer.bias.to("meta") for layer in layers], 1)
    assert [tuple(t.shape) for t in fake] == [(5, 192), (5, 64), (5, 128)]


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_projections_in_one_call_give_way():
    """Hooks on a projection, a projection that is not a GPTQLinear (a LoRA wrapper, a plain Linear), inputs the
    layer would not send to the CPU op (gradients, 8 bits), mixed zero offsets and a single module keep each
    module's own forward; the op names its faults."""
    from qwen2_moe_hf.moe import fused_projections

    layers = [_random_layer(256, 64, 64, False, 1, False, bias=True, seed=i) for i in range(3)]
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        assert fused_projections(x, layers) is not None
        assert fused_projections(x, layers[:1]) is None
        assert fused_projections(x, [layers[0], torch.nn.Linear(256, 64), layers[2]]) is None
        handle = layers[1].register_forward_hook(lambda *a: None)
        assert fused_projections(x, layers) is None
        handle.remove()
        other = _random_layer(256, 64, 64, False, 0, False, bias=True)
        assert fused_projections(x, [layers[0], other]) is None
        assert fused_projections(x.double(), layers) is None
        layers[2].bits = 8  # its forward would take the reference
        assert fused_projections(x, layers) is None
        layers[2].bits = 4
    assert fused_projections(x.requires_grad_(), layers) is None
    op = torch.ops.qwen2_moe_hf.gptq_linears_cpu
    tensors = [t for layer in layers for t in layer.tensors()]
    with pytest.raises(RuntimeError, match="a non-empty multiple of 4 tensors"):
        op(x[0].detach(), tensors[:5], [None], 1)
    with pytest.raises(RuntimeError, match="one entry .* per Linear"):
        op(x[0].detach(), tensors, [None], 1)
    wide = _random_layer(512, 64, 64, False, 1, False, bias=False)
    with pytest.raises(RuntimeError, match="linear 1 has 512 inputs"):
        op(x[0].detach(), tensors[:4] + list(wide.tensors()), [None, None], 1)
    with pytest.raises(RuntimeError, match=r"biases\[2\]"):
        op(x[0].detach(), tensors, [None, None, torch.zeros(7)], 1)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_blocked_qweight_faults_are_named_and_the_fake_knows_its_shape():
    layer = _random_layer(256, 192, 32, False, 1, False, bias=False)
    qb = gptq_format.block_qweight(layer.qweight)
    op = torch.ops.qwen2_moe_hf.gptq_linear_cpu
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match=r"qweight must be .* blocked, \[out_features/64, in_features/8, 64\]"):
        op(x, qb.reshape(6, 32, 32), layer.qzeros, layer.scales, layer.g_idx, 1, None)
    with pytest.raises(RuntimeError, match="scales"):
        op(x, qb, layer.qzeros, layer.scales[:, :128], layer.g_idx, 1, None)
    with pytest.raises(RuntimeError, match="x"):
        op(torch.randn(2, 128), qb, layer.qzeros, layer.scales, layer.g_idx, 1, None)
    meta = op(x.to("meta"), qb.to("meta"), layer.qzeros.to("meta"), layer.scales.to("meta"), layer.g_idx.to("meta"),
              1, None)
    assert meta.shape == (2, 192) and meta.device.type == "meta"


def test_blocked_layout_keeps_the_checkpoint_format_outside():
    """Blocked is a CPU kernel layout only: state_dict() and dequantize() give the checkpoint's qweight,
    load_state_dict takes it, a move off the CPU (meta here) restores the checkpoint layout, a dtype change keeps the
    blocks, and layers the kernels would not read blocked (out_features not a multiple of 64, 8 bits) stay as they
    are."""
    layer = _random_layer(128, 128, 32, True, 1, False, bias=False)
    original = layer.qweight.clone()
    want = layer.dequantize(torch.float32)
    assert layer.use_blocked_layout() and layer.qweight.shape == (2, 16, 64)
    assert torch.equal(layer.state_dict()["qweight"], original) and layer.state_dict()["qweight"].shape == (16, 128)
    assert torch.equal(layer.dequantize(torch.float32), want)
    layer.half()
    assert layer.blocked and layer.scales.dtype == torch.float16
    twin = _random_layer(128, 128, 32, True, 1, False, bias=False, seed=5)
    twin.use_blocked_layout()
    twin.load_state_dict(layer.state_dict())
    assert not twin.blocked and torch.equal(twin.qweight, original)
    assert twin.use_blocked_layout() and torch.equal(twin.dequantize(torch.float32), want)
    twin.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    assert not twin.blocked and torch.equal(twin.qweight, original)
    moved = copy.deepcopy(layer).to("meta")
    assert not moved.blocked and moved.qweight.shape == (16, 128) and moved.qweight.device.type == "meta"
    assert layer.use_blocked_layout(False) is False and torch.equal(layer.qweight, original)
    in_place = _random_layer(128, 128, 32, True, 1, False, bias=False)  # the loader's way: within its storage
    storage = in_place.qweight.data_ptr()
    assert in_place.use_blocked_layout(scratch=torch.empty(128 * 16 + 5, dtype=torch.int32))
    assert in_place.qweight.data_ptr() == storage and torch.equal(in_place.checkpoint_qweight(), original)
    assert in_place.use_blocked_layout(False, scratch=torch.empty(128 * 16, dtype=torch.int32)) is False
    assert in_place.qweight.data_ptr() == storage and torch.equal(in_place.qweight, original)
    narrow = _random_layer(128, 72, 32, True, 1, False, bias=False)
    assert not narrow.use_blocked_layout() and narrow.qweight.shape == (16, 72)
    eight = GPTQLinear(128, 128, False, GPTQSpec(bits=8, group_size=32))
    assert not eight.use_blocked_layout() and eight.qweight.dim() == 2


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_cpu_load_blocks_the_int4_layers_and_saves_the_checkpoint_back(gptq_checkpoint, tmp_path, monkeypatch):
    """A GPTQ checkpoint loaded on CPU holds its 4-bit qweights of 64k columns blocked (QWEN2_MOE_HF_INT4_LAYOUT=
    checkpoint keeps them as stored); both compute the same logits bit for bit, generate the same tokens, and
    save_pretrained writes the source's tensors back unchanged."""
    model = load(gptq_checkpoint)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    blocked = [m for m in layers if m.blocked]
    assert blocked and all(m.out_features % 64 == 0 for m in blocked)
    assert all(m.out_features % 64 for m in layers if not m.blocked)
    monkeypatch.setenv("QWEN2_MOE_HF_INT4_LAYOUT", "checkpoint")
    stored = load(gptq_checkpoint)
    monkeypatch.delenv("QWEN2_MOE_HF_INT4_LAYOUT")
    assert not any(m.blocked for m in stored.modules() if isinstance(m, GPTQLinear))
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stored(ids).logits)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(ids, **kwargs), stored.generate(ids, **kwargs))
    model.save_pretrained(str(tmp_path / "again"))
    source = {}
    for name in os.listdir(gptq_checkpoint):
        if name.endswith(".safetensors"):
            source.update(load_file(os.path.join(gptq_checkpoint, name)))
    again = {}
    for name in os.listdir(tmp_path / "again"):
        if name.endswith(".safetensors"):
            again.update(load_file(str(tmp_path / "again" / name)))
    for key, tensor in source.items():
        if key.endswith(".qweight"):
            assert torch.equal(again[key], tensor), key


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_save_pretrained_takes_no_copy_of_blocked_int4_weights(gptq_checkpoint, tmp_path, monkeypatch):
    """save_pretrained puts the blocked qweights back in the checkpoint layout within their own storage while it runs
    (state_dict() alone would make an unblocked copy of each: a second copy of the model's int4 weights), and blocks
    them again after, also when the save fails: same storage, same logits and decode steps after as before."""
    model = load(gptq_checkpoint)
    blocked = [m for m in model.modules() if isinstance(m, GPTQLinear) and m.blocked]
    storage = [m.qweight.data_ptr() for m in blocked]
    ids = torch.randint(1, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits, tokens = model(ids).logits, model.generate(ids, **kwargs)

    def no_copy(qweight):
        raise AssertionError("save_pretrained made an unblocked copy of a qweight")

    monkeypatch.setattr(gptq_format, "unblock_qweight", no_copy)
    model.save_pretrained(str(tmp_path / "again"))
    again = {}
    for name in os.listdir(tmp_path / "again"):
        if name.endswith(".safetensors"):
            again.update(load_file(str(tmp_path / "again" / name)))
    for name in os.listdir(gptq_checkpoint):
        if name.endswith(".safetensors"):
            for key, tensor in load_file(os.path.join(gptq_checkpoint, name)).items():
                assert torch.equal(again[key], tensor.to(again[key].dtype)), key

    def after_save(what):
        assert all(m.blocked for m in blocked), what
        assert [m.qweight.data_ptr() for m in blocked] == storage, what
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits), what
            assert torch.equal(model.generate(ids, **kwargs), tokens), what

    after_save("a save")

    def disk_full(*args, **kwargs):
        assert not any(m.blocked for m in blocked)  # the failure comes while the checkpoint layout is held
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)  # what both stacks' save calls
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(str(tmp_path / "full"))
    after_save("a failed save")


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_cpu_int4_moe_layer_through_onednn_matches_the_reference(rows, native_int4_rows):
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    native_int4_rows(rows)
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=64))
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), 4).eval()
    names = [f"{mlp}.{proj}" for mlp in [*(f"experts.{e}" for e in range(5)), "shared_expert"]
             for proj in ("gate_proj", "up_proj", "down_proj")]
    block = quantize_linears_(block, names, GPTQSpec(bits=4, group_size=32, sym=True)).to(torch.bfloat16)
    block.config.moe_backend = "cpu"
    gen = torch.Generator().manual_seed(2)
    for tokens in (1, 6, 23):
        x = torch.randn(tokens, 128, generator=gen).to(torch.bfloat16)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got, logits = block(x[None], return_router_logits=True)
        # The shared expert's jobs have `tokens` rows, the routed experts' at most `tokens` each.
        assert ("aten::mm" in {e.name for e in prof.events()}) == (rows > 0 and tokens >= rows), (tokens, rows)
        want = helpers.block_reference(block, x[None], logits)
        assert rel(got.reshape(-1, 128).float(), want.float()) < TOL[torch.bfloat16], (tokens, rows)


def _regrouped(g_idx):
    """Another valid g_idx for the same scales: the groups in reverse order."""
    return (int(g_idx.max()) - g_idx).to(g_idx.dtype)


def _set_data_twice(tensor, value):
    """`.data = ...` twice: neither write advances the version, and the second tensor may be given the memory the
    first write freed."""
    tensor.data = torch.zeros_like(tensor)
    tensor.data = value


# Changes to a used expert's GPTQ tensors that keep every tensor object (so the prepared weights and the C++ pack
# stay; the pack's kept int4 weights must see them): (module -> None).
KEPT_WEIGHT_CHANGES = {
    "g_idx_in_place": lambda m: m.g_idx.copy_(_regrouped(m.g_idx)),
    "g_idx_data_twice": lambda m: _set_data_twice(m.g_idx, _regrouped(m.g_idx)),
    "qweight_data": lambda m: setattr(m.qweight, "data", torch.randint_like(m.qweight, -2**31, 2**31 - 1)),
    "qweight_in_place": lambda m: m.qweight.bitwise_xor_(0x11111111),
    "scales_data_twice": lambda m: _set_data_twice(m.scales, m.scales * -2),
    "qzeros_in_place": lambda m: m.qzeros.bitwise_xor_(0x12345678),
}


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("change", list(KEPT_WEIGHT_CHANGES))
@pytest.mark.parametrize("blocked", [True, False])
def test_kept_int4_weights_follow_every_change_to_their_tensors(change, blocked):
    """The fused lane's pack keeps each int4 expert's prepared weight between calls: after any change to its tensors
    (in place, or `.data = ...` which advances no version), the next call computes what a fresh copy of the block
    computes, bit for bit."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    from qwen2_moe_hf.bench import int4_copy
    from qwen2_moe_hf.moe import route

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=192, shared_expert_intermediate_size=128))
    bf16 = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), 4).eval()
    block = int4_copy(bf16, GPTQSpec(bits=4, group_size=32, sym=True), blocked=blocked)
    block.config.moe_backend = "cpu"
    x = torch.randn(1, 1, 128).to(torch.bfloat16)
    with torch.no_grad():
        before, logits = block(x, return_router_logits=True)
        prepared = block.experts.__dict__["_prepared"][id(block.shared_expert)]
        used = int(route(logits, 2, False)[1][0, 0])
        for module in (block.experts[used].down_proj, block.shared_expert.gate_proj):
            KEPT_WEIGHT_CHANGES[change](module)
        after = block(x)
        assert block.experts.__dict__["_prepared"][id(block.shared_expert)] is prepared, "the change replaced an object: the pack was not kept"
        fresh = copy.deepcopy(block)(x)
    assert torch.equal(after, fresh)
    assert not torch.equal(after, before), "the change did not matter"


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_a_kept_int4_weight_with_g_idx_broken_in_place_is_refused_by_name():
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    from qwen2_moe_hf.bench import int4_copy

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=4,
        num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64))
    block = int4_copy(helpers.randomize_(Qwen2MoeSparseMoeBlock(config), 4).eval(),
                      GPTQSpec(bits=4, group_size=32, sym=True))
    block.config.moe_backend = "cpu"
    x = torch.randn(1, 1, 128).to(torch.bfloat16)
    with torch.no_grad():
        block(x)
        block.experts[2].up_proj.g_idx[70] = 4  # 4 groups of 32: one past the last
        with pytest.raises(RuntimeError, match=r"expert 2 up_proj: g_idx\[70\] = 4 is outside the 4 groups"):
            block(x)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_cpu_int4_kernel_survives_nan_inputs():
    layer = _random_layer(64, 16, 32, True, 1, False, bias=False)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    with torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_int4_linear_with_grad_uses_the_reference_and_gives_input_grads():
    layer = _random_layer(64, 16, 32, True, 1, False, bias=False)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantize(torch.float32).sum(0).expand(3, 64), atol=1e-5)


# --------------------------------------------------------------------------------------------- auto-gptq


def _autogptq_quantlinear():
    try:
        from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear
    except Exception as exc:  # noqa: BLE001 (any import failure means: not usable here)
        pytest.skip(f"auto-gptq is not installed here ({type(exc).__name__}); the blog-era stack installs it")
    return QuantLinear


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_our_layer_equals_autogptq_quantlinear(group_size, sym, desc_act):
    """Tensors packed by auto-gptq 0.7.1's own QuantLinear.pack: our layer's output equals its forward."""
    QuantLinear = _autogptq_quantlinear()
    k, n = 256, 64
    gen = torch.Generator().manual_seed(7)
    size = k if group_size == -1 else group_size
    groups = k // size
    g_idx = (torch.randperm(k, generator=gen) // size).int() if desc_act else torch.arange(k).int() // size
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).half().float()  # [N, G], fp16-exact
    zeros = torch.full((n, groups), 8.0) if sym else torch.randint(1, 16, (n, groups), generator=gen).float()
    q = torch.randint(0, 16, (n, k), generator=gen).float()
    weight = (q - zeros[:, g_idx.long()]) * scales[:, g_idx.long()]  # on the 4-bit grid, as pack expects
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = weight
    theirs = QuantLinear(4, group_size, k, n, bias=False)
    theirs.pack(linear, scales, zeros, g_idx)
    theirs.scales = theirs.scales.half()

    ours = GPTQLinear(k, n, False, GPTQSpec(bits=4, group_size=group_size, sym=sym, desc_act=desc_act))
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        ours._buffers[part] = getattr(theirs, part).clone()
    x = torch.randn(5, k, generator=gen)
    with torch.no_grad():
        expected = theirs(x.half()).float()
        assert rel(ours(x), expected) < 2e-3  # fp16 rounding of their fp16 weights and matmul
        assert rel(ours(x.half()), expected) < 2e-3
        assert torch.equal(ours.dequantize(torch.float32), weight)


@pytest.mark.parametrize("sym", [True, False])
def test_our_writer_reads_back_identically_through_autogptq(sym):
    QuantLinear = _autogptq_quantlinear()
    k, n = 128, 48
    packed = gptq_format.quantize_rtn(torch.randn(n, k), 4, 32, sym, 1)
    theirs = QuantLinear(4, 32, k, n, bias=False)
    for part, value in packed.items():
        setattr(theirs, part, value.clone())
    with torch.no_grad():
        their_weight = theirs(torch.eye(k, dtype=torch.float16)).t()  # row n: W[n, :] exactly, in fp16
    ours = gptq_format.dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, 1)
    assert torch.equal(their_weight, ours)


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("group_size,sym,fmt", [(32, True, "gptq"), (64, False, "gptq_v2"), (-1, False, "gptq")])
def test_checkpoint_loads_and_matches_dequantized_model(fp_checkpoint, tmp_path, group_size, sym, fmt):
    dst = quantize_checkpoint(fp_checkpoint, str(tmp_path / "q"), group_size=group_size, sym=sym,
                              checkpoint_format=fmt, progress=False)
    model = load(dst)
    assert type(model).__module__ == "qwen2_moe_hf.modeling_qwen2_moe"
    layer = model.model.layers[1]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_expert.down_proj", "mlp.experts.5.up_proj"):
        assert isinstance(layer.get_submodule(name), GPTQLinear), name
    assert isinstance(model.model.layers[0].mlp.gate_proj, GPTQLinear)  # dense-MLP layers are quantized too
    for name in ("mlp.gate", "mlp.shared_expert_gate"):  # the router and the shared gate stay full precision
        assert type(layer.get_submodule(name)) is torch.nn.Linear, name
    # lm_head stays full precision: our nn.Linear subclass (moe/dense.py), not a GPTQLinear.
    assert type(model.lm_head) is DecodeLinear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert layer.self_attn.q_proj.bias is not None  # q/k/v keep their bias

    twin = dequantized_twin(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        got, want = model(ids).logits, twin(ids).logits
    assert rel(got, want) < 1e-4


@pytest.mark.parametrize("fmt,sym,group_size", [("gptq", True, 32), ("gptq", False, 32), ("gptq_v2", False, 16),
                                                 ("gptq_v2", True, -1)])
def test_loaded_weights_are_within_half_a_step_of_the_source(fp_checkpoint, tmp_path, fmt, sym, group_size):
    """Every weight of every quantized Linear, loaded back through from_pretrained, against the full-precision
    checkpoint it was made from: a writer and reader that agreed with each other but not with the format would be
    a step or more off."""
    dst = quantize_checkpoint(fp_checkpoint, str(tmp_path / "q"), group_size=group_size, sym=sym,
                              checkpoint_format=fmt, progress=False)
    source = {}
    for name in os.listdir(fp_checkpoint):
        if name.endswith(".safetensors"):
            source.update(load_file(os.path.join(fp_checkpoint, name)))
    layers = [(name, m) for name, m in load(dst).named_modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 39  # q, k, v, o, and every MLP projection of the 3 layers
    for name, layer in layers:
        ok, excess = within_half_a_step(layer.dequantize(torch.float32), source[f"{name}.weight"].float(),
                                        layer.scales, layer.g_idx)
        assert ok, f"{name}: a weight is {excess:.2e} past half a step"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, "auto"])
@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_dtype_and_device_map(gptq_checkpoint, dtype, device_map):
    model = load(gptq_checkpoint, dtype=dtype, device_map=device_map)
    expected_dtype = torch.float16 if dtype == "auto" else dtype  # the writer stores float16, like Qwen's
    assert model.model.embed_tokens.weight.dtype == expected_dtype
    assert model.model.layers[1].mlp.experts[0].up_proj.scales.dtype == torch.float16  # kept as stored
    reference = load(gptq_checkpoint, dtype=torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        got = model(ids).logits
        assert got.dtype == expected_dtype
        assert rel(got, reference(ids).logits) < (1e-6 if expected_dtype == torch.float32 else 5e-2)


def test_default_dtype_is_float16_like_transformers_gptq(gptq_checkpoint):
    assert load(gptq_checkpoint, dtype=None).lm_head.weight.dtype == torch.float16


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy checkpoint folder src to dst, letting callbacks change tensors (per shard) and config.json."""
    import shutil

    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors") and edit_tensors is not None:
            path = os.path.join(dst, name)
            tensors = load_file(path)
            edit_tensors(tensors)
            save_file(tensors, path, metadata={"format": "pt"})
    if edit_config is not None:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        edit_config(config, dst)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return dst


def test_act_order_checkpoint(fp_checkpoint, tmp_path):
    """desc_act: g_idx in any order. Requantize every layer with a shuffled group assignment."""
    def shuffle(tensors):
        for key in [k for k in tensors if k.endswith(".qweight")]:
            prefix = key[: -len(".qweight")]
            weight = gptq_format.dequantize(tensors[key], tensors[prefix + ".qzeros"], tensors[prefix + ".scales"],
                                            tensors[prefix + ".g_idx"], 4, 1, torch.float32)
            k = weight.shape[1]
            g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(k)) // 32
            tensors.update({f"{prefix}.{p}": v for p, v in
                            gptq_format.quantize_rtn(weight, 4, 32, True, 1, g_idx).items()})

    base = quantize_checkpoint(fp_checkpoint, str(tmp_path / "q"), group_size=32, progress=False)
    path = _rewrite(base, str(tmp_path / "act"), shuffle,
                    lambda c, _: c["quantization_config"].update(desc_act=True))
    model = load(path)
    g_idx = model.model.layers[1].mlp.experts[0].gate_proj.g_idx
    assert not torch.equal(g_idx, torch.arange(g_idx.numel()).int() // 32)
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert rel(model(ids).logits, dequantized_twin(model)(ids).logits) < 1e-4


def test_legacy_quantize_config_json_and_zero_bias_placeholders(gptq_checkpoint, tmp_path):
    def add_zero_bias(tensors):
        for key in [k for k in tensors if k.endswith(("o_proj.qweight", "up_proj.qweight"))]:
            tensors[key.replace(".qweight", ".bias")] = torch.zeros(tensors[key].shape[1], dtype=torch.float16)

    def legacy(config, folder):
        with open(os.path.join(folder, "quantize_config.json"), "w") as f:
            json.dump(config.pop("quantization_config"), f)

    path = _rewrite(gptq_checkpoint, str(tmp_path / "legacy"), add_zero_bias, legacy)
    model = load(path)
    # All-zero biases are the placeholders AutoGPTQ writes for bias-free layers: dropped, so the experts keep the
    # fast path; a real bias would be kept (test_checkpoint_loads_and_matches_dequantized_model: q/k/v).
    layer = model.model.layers[1]
    assert layer.self_attn.o_proj.bias is None and layer.mlp.experts[0].up_proj.bias is None
    assert helpers.resolved_backend(layer.mlp, torch.zeros(1, model.config.hidden_size)) == helpers.resolved_backend(
        load(gptq_checkpoint).model.layers[1].mlp, torch.zeros(1, model.config.hidden_size))
    reference = load(gptq_checkpoint)
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_eight_bit_checkpoint(fp_checkpoint, tmp_path):
    path = quantize_checkpoint(fp_checkpoint, str(tmp_path / "q8"), bits=8, group_size=32, progress=False)
    model = load(path)
    assert model.model.layers[1].mlp.experts[0].down_proj.bits == 8
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert rel(model(ids).logits, dequantized_twin(model)(ids).logits) < 1e-5


def test_save_pretrained_round_trip_and_generate(gptq_checkpoint, tmp_path):
    model = load(gptq_checkpoint)
    model.save_pretrained(str(tmp_path / "again"))
    again = load(str(tmp_path / "again"))
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        out = again.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, 11)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_cpu_backend_runs_int4_experts_like_the_reference(gptq_checkpoint):
    model = load(gptq_checkpoint)
    ids = torch.randint(1, model.config.vocab_size, (3, 13))
    outputs = {}
    for backend in ("cpu", "torch"):
        model.config.moe_backend = backend
        with torch.no_grad(), int4_torch_oracle() if backend == "torch" else contextlib.nullcontext():
            outputs[backend] = model(ids).logits
    assert rel(outputs["cpu"], outputs["torch"]) < 1e-5


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("group_size,act_order", [(32, False), (-1, False), (32, True)])
@pytest.mark.parametrize("routing", ["spread", "all_on_one_expert"])
def test_cpu_int4_moe_layer_every_row_regime(group_size, act_order, routing):
    """The cpu backend's int4 MoE op against the same layer with its experts dequantized to fp32, in each of its
    row regimes: 1-15 rows per expert (the packed weights unpacked once per 4 rows, 1 to 4 rows a pass), 16-1023
    (tiles of 16 or 8 columns dequantized, then 6 rows at a time and 1-5 left over) and 1024+ (the weight
    dequantized once, then sgemm). Out features 40 = two 16-column tiles and an 8-column one."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=96, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=64))
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), 3).eval()
    spec = GPTQSpec(bits=4, group_size=group_size, sym=False, desc_act=act_order)
    gen = torch.Generator().manual_seed(1)
    for mlp in [*block.experts, block.shared_expert]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, name)
            g_idx = None
            if act_order and group_size > 0:
                g_idx = torch.randperm(linear.in_features, generator=gen) // group_size
            packed = gptq_format.quantize_rtn(linear.weight, 4, group_size, False, spec.zero_offset, g_idx)
            layer = GPTQLinear(linear.in_features, linear.out_features, False, spec)
            for part, value in packed.items():
                setattr(layer, part, value)
            setattr(mlp, name, layer)
    twin = copy.deepcopy(block)
    for mlp in [*twin.experts, twin.shared_expert]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(mlp, name)
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
            linear.weight.data = layer.dequantize(torch.float32)
            setattr(mlp, name, linear)
    block.config.moe_backend = "cpu"
    twin.config = copy.copy(block.config)
    twin.config.moe_backend = "torch"
    for tokens in (1, 3, 9, 31, 601):
        x = torch.randn(tokens, 96, generator=gen)
        ids = None
        if routing == "all_on_one_expert":  # 2 * tokens rows on expert 3: 2, 6, 18, 62, 1202 (sgemm)
            ids = torch.full((tokens, 2), 3)
        got, _ = helpers.routed(block, x, "cpu", ids)
        want, _ = helpers.routed(twin, x, "torch", ids)
        assert rel(got, want) < 1e-5, (tokens, rel(got, want))
        if routing == "spread":  # the whole block: the fused lane, with the 4-bit shared expert inside the op
            with torch.no_grad():
                assert helpers.resolved_backend(block, x) == "cpu"
                got, want = block(x[None]), twin(x[None])
            assert rel(got, want) < 1e-5, (tokens, rel(got, want))


def _int4_moe_block():
    """A bf16 MoE block (5 experts of 64, top-2, shared expert 192, hidden 128) whose expert and shared-expert
    projections are GPTQ 4-bit (group 32, asymmetric), on the cpu backend."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=192))
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), 5).eval()
    spec = GPTQSpec(bits=4, group_size=32, sym=False)
    for mlp in [*block.experts, block.shared_expert]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, name)
            layer = GPTQLinear(linear.in_features, linear.out_features, False, spec)
            for part, value in gptq_format.quantize_rtn(linear.weight, 4, 32, False, spec.zero_offset).items():
                setattr(layer, part, value)
            setattr(mlp, name, layer)
    block = block.to(torch.bfloat16)  # bf16 activations: the VNNI kernels where the build has them
    block.config.moe_backend = "cpu"
    return block


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_int4_moe_layer_with_16bit_activations_matches_the_reference(dtype):
    """fp16 activations (the compute dtype a GPTQ checkpoint loads in by default) take the VNNI kernels where the
    build has them, as bf16 ones do: the whole int4 block on the fused lane, 1-40 tokens, with the VNNI path on and
    off, within the dtype's bound of the fp32 reference routed from the same router logits."""
    from qwen2_moe_hf.kernels.build import cpu_module

    block = _int4_moe_block().to(dtype)
    gen = torch.Generator().manual_seed(3)
    try:
        for vnni in (True, False):
            cpu_module().set_int4_vnni(vnni)
            for tokens in (1, 3, 17, 40):
                x = torch.randn(1, tokens, 128, generator=gen).to(dtype)
                with torch.no_grad():
                    assert helpers.resolved_backend(block, x) == "cpu"
                    got, logits = block(x, return_router_logits=True)
                want = helpers.block_reference(block, x, logits.float())
                error = rel(got.reshape(-1, 128).float(), want)
                assert got.dtype == dtype and error < TOL[dtype], (vnni, tokens, error)
    finally:
        cpu_module().set_int4_vnni(True)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
@pytest.mark.parametrize("blocked", [False, True])
def test_cpu_int4_moe_one_row_jobs_are_bitwise_the_multi_row_kernel(blocked):
    """On VNNI builds the MoE op's jobs of one row (every job of a decode step; the experts with one token in a
    longer batch) take the one-row kernel, a decode step's jobs all in one parallel region; the layer is bit for bit
    what it gives with one region per job, and with the kernel switched off (each job through the multi-row
    kernel), through the fused lane and the registered op, at 1 token and at batches mixing one-row and many-row
    experts, in both qweight layouts."""
    from qwen2_moe_hf.kernels.build import cpu_module

    module = cpu_module()
    block = _int4_moe_block()
    if blocked:
        assert all(m.use_blocked_layout() for m in block.modules() if isinstance(m, GPTQLinear))
    gen = torch.Generator().manual_seed(7)
    try:
        for tokens in (1, 2, 3, 9):
            x = torch.randn(1, tokens, 128, generator=gen).to(torch.bfloat16)
            results = []
            for row_kernel, together in ((True, True), (True, False), (False, True)):
                module.set_int4_vnni_row(row_kernel)
                module.set_int4_jobs_together(together)
                with torch.no_grad():
                    assert helpers.resolved_backend(block, x[0]) == "cpu"
                    fused = block(x)
                routed, _ = helpers.routed(block, x[0], "cpu")  # the block's own routing: one row per expert at 1
                results.append((fused, routed))
            for other in results[1:]:
                for got, want in zip(results[0], other):
                    assert torch.equal(got, want), (tokens, (got.float() - want.float()).abs().max())
    finally:
        module.set_int4_vnni_row(True)
        module.set_int4_jobs_together(True)


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_cpu_int4_moe_layer_with_blocked_experts_is_bitwise_the_checkpoint_layout():
    """The MoE op reads blocked expert weights (every projection 64k columns wide here) in each row regime and gives
    bit for bit what it gives on the checkpoint layout; a layer with both layouts mixed (only some blocked) too."""
    block = _int4_moe_block()
    blocked, mixed = copy.deepcopy(block), copy.deepcopy(block)
    for m in blocked.modules():
        if isinstance(m, GPTQLinear):
            assert m.use_blocked_layout()
    for i, m in enumerate(m for m in mixed.modules() if isinstance(m, GPTQLinear)):
        m.use_blocked_layout(i % 2 == 0)
    gen = torch.Generator().manual_seed(6)
    for tokens in (1, 3, 9, 31, 601):
        x = torch.randn(1, tokens, 128, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            assert helpers.resolved_backend(blocked, x[0]) == "cpu"
            want = block(x)
            assert torch.equal(blocked(x), want), tokens
            assert torch.equal(mixed(x), want), tokens
        got, _ = helpers.routed(blocked, x[0], "cpu", torch.full((tokens, 2), 3))
        ref, _ = helpers.routed(block, x[0], "cpu", torch.full((tokens, 2), 3))
        assert torch.equal(got, ref), tokens


# --------------------------------------------------------------------------------------------- faults


def _qcfg_edit(**changes):
    return lambda config, _: config["quantization_config"].update(changes)


@pytest.mark.parametrize("changes,needle", [
    (dict(bits=3), "quantization_config.bits: 3 is not supported"),
    (dict(group_size=0), "quantization_config.group_size"),
    (dict(checkpoint_format="marlin"), "quantization_config.checkpoint_format"),
    (dict(modules_in_block_to_quantize=[["self_attn.q_proj"]]), "modules_in_block_to_quantize"),
    (dict(group_size=64), "group_size 64"),  # the scales on disk have the groups of 32
])
def test_bad_quantization_config_is_named(gptq_checkpoint, tmp_path, changes, needle):
    path = _rewrite(gptq_checkpoint, str(tmp_path / "bad"), edit_config=_qcfg_edit(**changes))
    with pytest.raises(GPTQFormatError, match=needle.replace("(", r"\(")):
        load(path)


@pytest.mark.parametrize("fault,needle", [
    ("drop_up", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.qweight"),
    ("g_idx_range", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.g_idx.*\[0, 1\]"),
    ("qzeros_shape", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.qzeros.*shape"),
    ("qweight_dtype", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.qweight.*dtype"),
    ("scales_nan", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.scales.*NaN"),
    ("bias_int", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.bias.*dtype torch\.int32"),
    ("bias_nan", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.bias.*NaN"),
    ("bias_shape", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.bias.*shape"),
    ("no_g_idx_short_qweight", r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.qweight.*shape"),
])
def test_bad_gptq_tensor_is_named(gptq_checkpoint, tmp_path, fault, needle):
    prefix = "model.layers.1.mlp.experts.2.up_proj"

    def edit(tensors):
        if f"{prefix}.qweight" not in tensors:
            return
        if fault == "drop_up":
            for part in ("qweight", "qzeros", "scales", "g_idx"):
                del tensors[f"{prefix}.{part}"]
        elif fault == "g_idx_range":
            tensors[f"{prefix}.g_idx"][3] = 7
        elif fault == "qzeros_shape":
            tensors[f"{prefix}.qzeros"] = tensors[f"{prefix}.qzeros"][:1].contiguous()
        elif fault == "qweight_dtype":
            tensors[f"{prefix}.qweight"] = tensors[f"{prefix}.qweight"].to(torch.int64)
        elif fault == "scales_nan":
            tensors[f"{prefix}.scales"][0, 0] = float("nan")
        elif fault.startswith("bias"):
            out = tensors[f"{prefix}.scales"].shape[1]
            tensors[f"{prefix}.bias"] = {"bias_int": torch.zeros(out, dtype=torch.int32),
                                         "bias_nan": torch.full((out,), float("nan"), dtype=torch.float16),
                                         "bias_shape": torch.zeros(out + 1, dtype=torch.float16)}[fault]
        elif fault == "no_g_idx_short_qweight":  # checked before a default g_idx is made from the config
            del tensors[f"{prefix}.g_idx"]
            tensors[f"{prefix}.qweight"] = tensors[f"{prefix}.qweight"][:-1].contiguous()

    path = _rewrite(gptq_checkpoint, str(tmp_path / "bad"), edit)
    if fault in ("drop_up", "no_g_idx_short_qweight"):  # the index still names the dropped tensors
        os.remove(os.path.join(path, "model.safetensors.index.json"))
        shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        files = {n: load_file(os.path.join(path, n)) for n in shards}
        merged = {k: v for t in files.values() for k, v in t.items()}
        for n in shards:
            os.remove(os.path.join(path, n))
        save_file(merged, os.path.join(path, "model.safetensors"))
    with pytest.raises((GPTQFormatError, CheckpointError), match=needle):
        load(path)


def test_non_contiguous_tensors_assigned_through_load_state_dict_compute_right(gptq_checkpoint):
    """load_state_dict(..., assign=True) puts the caller's tensors in the model as they are: non-contiguous GPTQ
    tensors then reach the int4 op (which used to read freed memory for them, or crash on a strided g_idx)."""
    model = load(gptq_checkpoint)
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        state = {}
        for name, tensor in model.state_dict().items():
            if name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                tensor = torch.stack([tensor, tensor], -1)[..., 0]  # same values, every other element
                assert not tensor.is_contiguous()
            state[name] = tensor
        model.load_state_dict(state, assign=True)
        assert not model.model.layers[1].mlp.experts[0].up_proj.g_idx.is_contiguous()
        after = model(ids).logits
        with int4_torch_oracle():
            oracle = model(ids).logits
    assert rel(after, before) < 1e-6 and rel(after, oracle) < 1e-5


def test_unknown_extra_tensors_warn(gptq_checkpoint, tmp_path, caplog):
    import logging

    def add(tensors):
        if "model.layers.1.mlp.experts.2.up_proj.qweight" in tensors:
            tensors["model.layers.1.mlp.mystery.weight"] = torch.zeros(3)

    path = _rewrite(gptq_checkpoint, str(tmp_path / "extra"), add)
    with caplog.at_level(logging.WARNING, logger="qwen2_moe_hf"):
        load(path)
    assert "model.layers.1.mlp.mystery.weight" in caplog.text and "not used" in caplog.text


def test_disk_offload_is_refused_for_gptq(gptq_checkpoint):
    with pytest.raises(ValueError, match="GPTQ layers cannot be offloaded to disk"):
        load(gptq_checkpoint, device_map={"": "disk"})


def test_truncated_shard_is_named(gptq_checkpoint, tmp_path):
    path = _rewrite(gptq_checkpoint, str(tmp_path / "trunc"))
    shard = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[-1]
    full = os.path.getsize(os.path.join(path, shard))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(CheckpointError, match=f"{shard}: truncated"):
        load(path)


# --------------------------------------------------------------------------------------------- who loads


def test_transformers_gptq_quantizer_never_runs(gptq_checkpoint, monkeypatch):
    """Our loader handles GPTQ checkpoints of our model: transformers' quantizer (and optimum's, where installed)
    would fail the test if anything constructed them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a GPTQ quantizer other than qwen2_moe_hf's ran")

    from transformers.quantizers import quantizer_gptq

    monkeypatch.setattr(quantizer_gptq.GptqHfQuantizer, "__init__", refuse)
    try:
        import optimum.gptq

        monkeypatch.setattr(optimum.gptq.GPTQQuantizer, "__init__", refuse)
    except ImportError:
        pass
    model = load(gptq_checkpoint)
    assert getattr(model, "hf_quantizer", None) is None
    assert isinstance(model.model.layers[1].mlp.experts[3].down_proj, GPTQLinear)


def test_cli_quantize_writes_a_loadable_checkpoint(fp_checkpoint, tmp_path):
    dst = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "-m", "qwen2_moe_hf.cli", "quantize", "--method", "rtn", "--bits", "4", "--group-size",
         "32", fp_checkpoint, dst], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "quantizing" in result.stderr  # the progress bar
    with open(os.path.join(dst, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32 and qcfg["quant_method"] == "gptq"
    flat = {name for group in qcfg["modules_in_block_to_quantize"] for name in group}
    assert "mlp.experts.0.up_proj" in flat and "mlp.gate" not in flat and "mlp.shared_expert_gate" not in flat
    assert isinstance(load(dst).model.layers[1].mlp.experts[0].gate_proj, GPTQLinear)


def test_real_gptq_config_is_understood():
    from helpers import METADATA_DIR

    path = os.path.join(METADATA_DIR, "Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4.config.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (../shared is not beside the repository)")
    with open(path) as f:
        spec = GPTQSpec.from_dict(json.load(f)["quantization_config"])
    assert (spec.bits, spec.group_size, spec.sym, spec.desc_act, spec.zero_offset) == (4, 128, True, False, 1)
    assert "mlp.experts.59.down_proj" in spec.modules_in_block_to_quantize
    assert "mlp.gate" not in spec.modules_in_block_to_quantize
    assert spec.tensor_shapes(2048, 1408) == {"qweight": (256, 1408), "qzeros": (16, 176), "scales": (16, 1408),
                                              "g_idx": (2048,)}


@pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
def test_cpu_backend_sees_a_wrapped_int4_projection(gptq_checkpoint):
    """A PEFT-style wrapper around one expert's GPTQ layer changes no GPTQ tensor; the cpu backend's int4 cache must
    still notice the new module (and, as it cannot run a wrapper, leave the call to the torch path)."""
    from helpers import Scaled

    model = load(gptq_checkpoint)
    ids = torch.randint(1, model.config.vocab_size, (2, 7))
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        before = model(ids).logits  # auto: the cpu backend, which caches the layer's int4 tensors
        x = torch.randn(3, model.config.hidden_size)
        assert helpers.resolved_backend(mlp, x) == "cpu"
        for expert in mlp.experts:  # every expert, so that whichever the tokens pick, the change shows
            expert.up_proj = Scaled(expert.up_proj)
        after = model(ids).logits
        assert helpers.resolved_backend(mlp, x) == "torch"
        model.config.moe_backend = "torch"
        reference = model(ids).logits
        with int4_torch_oracle():
            oracle = model(ids).logits
    assert rel(after, before) > 1e-3
    assert torch.equal(after, reference)  # the wrapped layers ran where the torch backend runs them
    assert rel(after, oracle) < 1e-5


def test_cpu_backend_sees_replaced_int4_tensors(gptq_checkpoint):
    """The cpu backend caches each layer's int4 tensor list; swapping an expert's layer must not leave it stale."""
    model = load(gptq_checkpoint)
    ids = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    model.config.moe_backend = "cpu"
    with torch.no_grad():
        seen = []
        hook = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o))
        before = model(ids).logits
        hook.remove()
        # The expert of layer 1 that most of these tokens use: swapping it must move the logits.
        chosen = seen[0].topk(model.config.num_experts_per_tok, dim=-1).indices
        busiest = int(torch.bincount(chosen.flatten(), minlength=model.config.num_experts).argmax())
        experts = model.model.layers[1].mlp.experts
        old = experts[busiest].up_proj
        new = copy.deepcopy(old)
        new.qweight = torch.bitwise_xor(old.qweight, torch.tensor(0x11111111, dtype=torch.int32))
        experts[busiest].up_proj = new
        after_cpu = model(ids).logits
        model.config.moe_backend = "torch"
        with int4_torch_oracle():
            after_ref = model(ids).logits
    assert rel(after_cpu, before) > 1e-4  # the swap matters...
    assert rel(after_cpu, after_ref) < 1e-5  # ...and the cpu backend computes with the new tensors
