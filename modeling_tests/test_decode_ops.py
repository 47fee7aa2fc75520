"""A decode step's attention, RMSNorms and RoPE on the CPU ops (`decode_attention_cpu`, `rms_norm_cpu`, `rope_cpu`).

The ops are held to plain-torch references per dtype at odd sizes (grouped-query heads, head sizes that are not a
multiple of the vector width, masks of each kind, a KV cache read in place through its strides); the model to the
same steps through torch's own code: which calls take the ops and which must not (prefill, eager attention, asked-for
attention weights, gradients, dropout, compile), and a whole greedy generate, left-padded batch included, against
the model with the ops switched off."""

import pytest
import torch
import torch.nn.functional as F

import qwen2_moe_hf
import qwen2_moe_hf.modeling_qwen2_moe as modeling
from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeRMSNorm, apply_rotary_pos_emb
from qwen2_moe_hf.moe import decode_attention, dense, rope

import helpers
import op_reference as ref

pytestmark = pytest.mark.skipif(qwen2_moe_hf.env_report()["cpu"] != "available",
                                reason=f"the CPU ops do not run here: {qwen2_moe_hf.env_report()['cpu']}")

ATTENTION = "qwen2_moe_hf::decode_attention_cpu"
NORM = "qwen2_moe_hf::rms_norm_cpu"
ROPE = "qwen2_moe_hf::rope_cpu"
# Per row, against the fp32 reference on the same values: fp32 sums in another order, then one rounding.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _events(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def _mask(kind, batch, heads, length, dtype, gen):
    if kind is None:
        return None
    allowed = torch.rand(batch, heads, 1, length, generator=gen) > 0.4
    allowed[..., -1] = True  # the new token always sees itself
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [(1, 16, 16, 130, 128), (2, 8, 2, 37, 64),
                                                              (3, 4, 1, 5, 13), (1, 2, 2, 1, 8)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "per-head bool"])
def test_decode_attention_matches_the_reference(dtype, batch, heads, kv_heads, length, dim, mask_kind):
    gen = torch.Generator().manual_seed(length * dim + heads)
    # q as the attention module makes it (a transposed view), k/v as the first `length` positions of a longer cache
    q = torch.randn(batch, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    cache = torch.randn(2, batch, kv_heads, length + 7, dim, generator=gen).to(dtype)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]
    assert not k.is_contiguous()
    mask = _mask("bool" if mask_kind == "per-head bool" else mask_kind, batch,
                 heads if mask_kind == "per-head bool" else 1, length, dtype, gen)
    got = torch.ops.qwen2_moe_hf.decode_attention_cpu(q, k, v, mask, dim**-0.5)
    want = ref.decode_attention(q, k, v, mask, dim**-0.5)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == dtype and got.is_contiguous()
    assert helpers.row_error(got, want) <= TOL[dtype], helpers.row_error(got, want)


def test_decode_attention_edges():
    """A row masked everywhere gives zeros; NaN in one cached key reaches only the heads reading it; torch's SDPA
    agrees on ordinary inputs; no cached positions gives zeros."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k = torch.randn(2, 2, 9, 16, generator=gen)
    v = torch.randn(2, 2, 9, 16, generator=gen)
    op = torch.ops.qwen2_moe_hf.decode_attention_cpu
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    out = op(q, k, v, mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.25)
    torch.testing.assert_close(op(q, k, v, None, 0.25), sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)
    bad = k.clone()
    bad[0, 1, 4, 3] = float("nan")  # key/value head 1 of sequence 0: query heads 2 and 3
    out = op(q, bad, v, None, 0.25)
    assert out[0, 0, 2:].isnan().all() and not out[0, 0, :2].isnan().any() and not out[1].isnan().any()
    empty = op(q, k[:, :, :0], v[:, :, :0], None, 0.25)
    assert torch.equal(empty, torch.zeros(2, 1, 4, 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 37), (4, 7)])
def test_rms_norm_matches_the_modules_torch_code(dtype, shape):
    """Within a few units in the last place of the torch code it replaces (the fp32 statistics are summed in another
    order: fp32 results move by an ulp or so, a bf16 / fp16 rounding rarely moves), and in bf16 / fp16 equal almost
    everywhere."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    norm = Qwen2MoeRMSNorm(shape[-1], eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(shape[-1], generator=gen).to(dtype)
    weight = norm.weight.detach()
    got = torch.ops.qwen2_moe_hf.rms_norm_cpu(x, weight, 1e-6)
    want = ref.rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    ulps = 4 if dtype == torch.float32 else 2  # fp32: the statistic's few-ulp difference passes straight through
    assert ((got.float() - want.float()).abs() <= ulps * ulp).all()
    if dtype != torch.float32:  # the statistics' last bit rarely moves a bf16 / fp16 rounding
        assert (got != want).float().mean() <= 0.01
    with torch.no_grad():
        module_out, events = _events(lambda: norm(x))
    assert NORM in events and torch.equal(module_out, got)


def test_rms_norm_gives_way():
    """Gradients, a weight of another dtype than x, and compile run the torch code."""
    norm = Qwen2MoeRMSNorm(32).bfloat16()
    x = torch.randn(2, 32).bfloat16()
    for name, fn in {"gradients": lambda: norm(x),
                     "fp32 weight": lambda: Qwen2MoeRMSNorm(32)(x)}.items():
        _, events = _events(fn)
        assert NORM not in events, name
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref.rms_norm(x, norm.weight, norm.variance_epsilon), rtol=1e-2,
                                   atol=1e-2)


def _rope_inputs(batch, heads, kv_heads, length, dim, dtype, cos_batch, gen):
    """q, k as the attention module makes them (transposed views of the projections' outputs); cos, sin as the
    rotary module makes them (in the model's dtype) for positions 0..length-1, shifted per sequence."""
    q = torch.randn(batch, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(batch, length, kv_heads, dim, generator=gen).to(dtype).transpose(1, 2)
    positions = torch.arange(length)[None] + 3 * torch.arange(cos_batch)[:, None] + 100
    freqs = positions[..., None].float() / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat((freqs, freqs), -1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,cos_batch", [
    (1, 16, 16, 1, 128, 1), (2, 8, 2, 1, 64, 2), (3, 4, 1, 7, 14, 3), (2, 2, 2, 5, 8, 1), (1, 1, 1, 1, 2, 1)])
def test_rope_is_bitwise_the_eager_code(dtype, batch, heads, kv_heads, length, dim, cos_batch):
    """q * cos + rotate_half(q) * sin for query and key, bit for bit the eager code (every product and the sum
    rounded to the dtype as torch does), from transposed views, with grouped-query key heads, a batch-1 cos / sin
    broadcast over the batch, a decode step and a prompt, head_dim 2 up to 128; outputs contiguous. The module
    takes the op in inference and gives the same."""
    gen = torch.Generator().manual_seed(batch * 100 + dim)
    q, k, cos, sin = _rope_inputs(batch, heads, kv_heads, length, dim, dtype, cos_batch, gen)
    assert not q.is_contiguous() or length == 1
    got_q, got_k = torch.ops.qwen2_moe_hf.rope_cpu(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous() and got_q.dtype == got_k.dtype == dtype
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert helpers.row_error(got_q, ref.rope(q, k, cos, sin)[0]) <= TOL[dtype]
    with torch.no_grad():
        fused = rope(q, k, cos, sin)
    assert fused is not None and torch.equal(fused[0], want_q) and torch.equal(fused[1], want_k)


def test_rope_gives_way():
    """Shapes the op does not take (the eager code broadcasts or raises as before), other dtypes, mixed dtypes,
    subclasses, gradients and compile keep the eager code."""
    gen = torch.Generator().manual_seed(0)
    q, k, cos, sin = _rope_inputs(2, 4, 2, 3, 8, torch.float32, 2, gen)
    with torch.no_grad():
        assert rope(q, k, cos, sin) is not None
        assert rope(q, k, cos[:, None], sin[:, None]) is None  # [b, 1, l, d]: the eager code broadcasts it
        assert rope(q.double(), k.double(), cos.double(), sin.double()) is None
        assert rope(q, k, cos.bfloat16(), sin.bfloat16()) is None
        assert rope(q.as_subclass(_Tagged), k, cos, sin) is None
        assert rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]) is None  # odd head_dim
        assert rope(q, k[:, :, :2], cos, sin) is None  # key of another length
    assert rope(q.requires_grad_(), k, cos, sin) is None
    compiled = torch.compile(lambda *t: rope(*t), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert compiled(q, k, cos, sin) is None


def test_rope_op_checks_its_arguments():
    gen = torch.Generator().manual_seed(1)
    q, k, cos, sin = _rope_inputs(2, 4, 2, 3, 8, torch.float32, 2, gen)
    op = torch.ops.qwen2_moe_hf.rope_cpu
    with pytest.raises(RuntimeError, match="query's head_dim .* must be even"):
        op(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(RuntimeError, match=r"cos must have shape \[2 or 1, 3, 8\]"):
        op(q, k, torch.cat([cos, cos]), sin)
    with pytest.raises(RuntimeError, match="sin"):
        op(q, k, cos, sin[:1])
    with pytest.raises(RuntimeError, match="key"):
        op(q, k.bfloat16(), cos, sin)


def _switch_off(monkeypatch):
    monkeypatch.setattr(modeling, "decode_attention", lambda *a, **k: None)
    monkeypatch.setattr(modeling, "rms_norm", lambda *a, **k: None)
    monkeypatch.setattr(modeling, "rope", lambda *a, **k: None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_generate_matches_torch_attention_and_norms(dtype, monkeypatch):
    """Greedy generate on a left-padded batch of two: decode steps take the three ops, the prompt's step takes
    torch's attention; the logits of every step and the tokens equal those of the model with the ops switched
    off."""
    model = helpers.build_model("gqa").to(dtype)
    ids = torch.tensor([[0, 0, 5, 9, 2, 7], [4, 8, 1, 6, 3, 2]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                                  return_dict_in_generate=True)

    fast, events = _events(run)
    assert ATTENTION in events and NORM in events and ROPE in events
    _switch_off(monkeypatch)
    slow, events = _events(run)
    assert ATTENTION not in events and NORM not in events and ROPE not in events
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.scores, slow.scores):
        assert helpers.row_error(a, b) <= (3e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gptq_attention_projects_in_one_call(dtype, monkeypatch):
    """A GPTQ-Int4 model's attention runs q, k, v in one gptq_linears_cpu call (prompt and decode steps), and greedy
    generate gives the same logits, bit for bit, as with the three projections called one by one."""
    from qwen2_moe_hf.bench import int4_copy

    model = int4_copy(helpers.build_model("gqa"), attention=True, blocked=True).to(dtype)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])

    def run():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None,
                                  output_scores=True, return_dict_in_generate=True)

    fused, events = _events(run)
    assert "qwen2_moe_hf::gptq_linears_cpu" in events
    monkeypatch.setattr(modeling, "fused_projections", lambda *a, **k: None)
    alone, events = _events(run)
    assert "qwen2_moe_hf::gptq_linears_cpu" not in events and "qwen2_moe_hf::gptq_linear_cpu" in events
    assert torch.equal(fused.sequences, alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.scores, alone.scores))


def test_attention_gives_way():
    """Only sdpa's single-query steps without gradients take the op: eager (chosen, or for attention weights),
    prompts of several tokens, training with dropout, and gradients keep the attention function they name."""
    model = helpers.build_model("gqa").bfloat16().eval()
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        _, events = _events(lambda: model(ids[:, -1:]))
        assert ATTENTION in events, "one query position, no gradients"
        _, events = _events(lambda: model(ids))
        assert ATTENTION not in events, "a prompt of several tokens"
        out, events = _events(lambda: model(ids[:, -1:], output_attentions=True))
        assert ATTENTION not in events and out.attentions[0] is not None, "attention weights asked for"
    _, events = _events(lambda: model(ids[:, -1:]))
    assert ATTENTION not in events, "gradients"
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        _, events = _events(lambda: model(ids[:, -1:]))
    assert ATTENTION not in events, "eager chosen"


class _Tagged(torch.Tensor):
    pass


def test_decode_attention_helper_gives_way():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 3, 8)
    assert decode_attention(q, k, k, None, 0.3) is not None
    assert decode_attention(q, k, k, None, 0.3, dropout=0.1) is None
    assert decode_attention(q, k, k, None, 0.3, softcap=30.0) is None
    assert decode_attention(q, k, k, None, 0.3, sliding_window=2) is None  # the mask does not hold the window
    assert decode_attention(q, k, k, torch.ones(1, 1, 1, 5, dtype=torch.bool), 0.3) is None  # a longer mask
    assert decode_attention(torch.randn(1, 4, 2, 8), k, k, None, 0.3) is None  # two query positions
    assert decode_attention(q, k.double(), k.double(), None, 0.3) is None
    assert decode_attention(q.as_subclass(_Tagged), k, k, None, 0.3) is None  # a subclass (as DTensor is)
    assert decode_attention(q.requires_grad_(), k, k, None, 0.3) is None
    with torch.no_grad():
        assert decode_attention(q, k, k, None, 0.3) is not None
    assert dense.decode_attention is decode_attention
