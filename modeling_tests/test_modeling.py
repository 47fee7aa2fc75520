"""The model's parts against simple references: the MoE block against a per-token loop, cached decoding against a
full forward, eager against sdpa, losses against their definitions, gradient checkpointing against plain backward."""

import pytest
import torch
import torch.nn.functional as F

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeForSequenceClassification, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf import compat, load_balancing_loss_func

import helpers


def per_token_moe(block, hidden_states):
    """The MoE block's definition, one token at a time."""
    cfg = block.config
    out = torch.zeros_like(hidden_states)
    flat_in, flat_out = hidden_states.reshape(-1, cfg.hidden_size), out.view(-1, cfg.hidden_size)
    for t, x in enumerate(flat_in):
        probs = torch.softmax(block.gate.weight.float() @ x.float(), dim=-1)
        # The documented rank (moe/routing.py): larger probability first, equal ones by the lower expert id.
        ids = sorted(range(cfg.num_experts), key=lambda e: (-probs[e].item(), e))[:cfg.num_experts_per_tok]
        weights = probs[ids]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(x, dtype=torch.float32)
        for w, e in zip(weights, ids):
            y += w * block.experts[e](x[None]).float()[0]
        shared = torch.sigmoid(block.shared_expert_gate(x[None]).float()) * block.shared_expert(x[None]).float()
        flat_out[t] = (y + shared[0]).to(x.dtype)
    return out


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 5)])
def test_moe_block_matches_per_token_loop(shape, norm_topk_prob):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs("top3_of_8_wide_heads", norm_topk_prob=norm_topk_prob))
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(config)
    helpers.randomize_(block, seed=3)
    x = torch.randn(*shape, config.hidden_size)
    with torch.no_grad():
        got, router_logits = block(x, return_router_logits=True)
        expected = per_token_moe(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert router_logits.shape == (shape[0] * shape[1], config.num_experts)


def test_moe_block_router_ties_and_idle_experts():
    """All router logits equal (a zero router): the lowest expert ids win the tie; other experts get nothing."""
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs())
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed=4)
    with torch.no_grad():
        block.gate.weight.zero_()
        x = torch.randn(2, 3, config.hidden_size)
        torch.testing.assert_close(block(x), per_token_moe(block, x), rtol=1e-5, atol=1e-5)


def test_moe_block_bf16_close_to_fp32():
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs())
    block = helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed=5)
    x = torch.randn(4, 6, config.hidden_size)
    with torch.no_grad():
        expected = block(x)
        got = block.to(torch.bfloat16)(x.bfloat16()).float()
    # Routing may flip on bf16 near-ties for a token or two; the bulk must agree to bf16 precision.
    close = ((got - expected).abs() <= 3e-2 * expected.abs().max()).float().mean()
    assert close > 0.97


def test_moe_block_state_dict_uses_hub_names():
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs())
    keys = set(Qwen2MoeSparseMoeBlock(config).state_dict())
    expected = {"gate.weight", "shared_expert_gate.weight"}
    expected |= {f"shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
    expected |= {f"experts.{e}.{p}_proj.weight" for e in range(config.num_experts) for p in ("gate", "up", "down")}
    assert keys == expected


def test_layer_kinds_follow_sparse_step_and_mlp_only_layers():
    model = helpers.build_model("sparse_step2_mha_norm")
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock"] * 2
    model = helpers.build_model("mlp_only_mqa_norm")
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP"]


@pytest.mark.parametrize("name", ["gqa", "mlp_only_mqa_norm"])
def test_cached_decoding_matches_full_forward(name):
    model = helpers.build_model(name)
    input_ids, attention_mask, position_ids = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        out = model(input_ids[:, :7], attention_mask=attention_mask[:, :7], position_ids=position_ids[:, :7],
                    use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(7, input_ids.shape[1]):
            out = model(input_ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1],
                        position_ids=position_ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backend", [name for name, state in qwen2_moe_hf.env_report().items() if state == "available"])
@pytest.mark.parametrize("padded", [True, False])
def test_multi_token_steps_on_a_non_empty_cache(attn, backend, padded):
    """Chunks of several tokens fed onto a cache that already holds some (speculative decoding, chunked prefill,
    a chat turn appended to a cached history): the causal mask must be aligned to the end of the cache, not its
    start. Prefill 5, then 4 tokens, then 3, against one full forward."""
    model = helpers.build_model("gqa")
    model.config._attn_implementation = attn
    model.config.moe_backend = backend
    input_ids, attention_mask, position_ids = helpers.parity_inputs(model.config.vocab_size)
    if not padded:
        attention_mask, position_ids = torch.ones_like(input_ids), None
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        steps, cache = [], None
        for start, end in ((0, 5), (5, 9), (9, 12)):
            out = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                        position_ids=None if position_ids is None else position_ids[:, start:end],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert cache.get_seq_length() == 12
    real = attention_mask.bool()
    assert helpers.row_error(torch.cat(steps, 1)[real], full[real]) < 1e-5


def test_legacy_tuple_cache_is_accepted():
    model = helpers.build_model("gqa")
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        first = model(ids[:, :5], use_cache=True)
        cache = first.past_key_values
        legacy = tuple((cache.key_cache[i], cache.value_cache[i]) for i in range(3)) if hasattr(
            cache, "key_cache") else tuple((layer.keys, layer.values) for layer in cache.layers)
        step = model(ids[:, 5:], past_key_values=legacy, use_cache=True).logits
        full = model(ids).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_eager_matches_sdpa_and_returns_attention_weights():
    model = helpers.build_model("gqa")
    input_ids, attention_mask, position_ids = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        sdpa = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, output_attentions=True)
    real = attention_mask.bool()
    torch.testing.assert_close(eager.logits[real], sdpa[real], rtol=1e-5, atol=1e-5)
    assert len(eager.attentions) == 3 and eager.attentions[0].shape == (2, 4, 12, 12)
    # No attention to padding keys, and none to the future.
    assert eager.attentions[0][0, :, 4:, :4].abs().max() == 0
    assert torch.triu(eager.attentions[0][1], diagonal=1).abs().max() == 0


def test_labels_give_the_shifted_cross_entropy_plus_aux_loss():
    model = helpers.build_model("gqa")
    ids = torch.randint(1, 128, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss, expected)
        with_aux = model(ids, labels=labels, output_router_logits=True)
    assert len(with_aux.router_logits) == 3
    aux = load_balancing_loss_func(with_aux.router_logits, 6, 2)
    torch.testing.assert_close(with_aux.aux_loss, aux)
    torch.testing.assert_close(with_aux.loss, expected + model.config.router_aux_loss_coef * aux)


def test_load_balancing_loss_definition():
    """Perfectly balanced routing gives exactly 1 (num_experts * sum of 1/E * 1/E * E ... ), collapse gives more."""
    num_experts, top_k = 4, 1
    balanced = torch.eye(4).repeat(2, 1) * 20.0  # each expert wins exactly 2 of 8 tokens, near-one-hot probs
    value = load_balancing_loss_func((balanced,), num_experts, top_k)
    assert abs(value.item() - 1.0) < 1e-6
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 20.0
    assert load_balancing_loss_func((collapsed,), num_experts, top_k).item() > 3.9
    # Padding rows are left out of the statistics.
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    mixed = torch.cat([balanced[:4], collapsed[:4]])
    torch.testing.assert_close(load_balancing_loss_func((mixed,), num_experts, top_k, mask), value)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    from qwen2_moe_hf import compat
    from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeDecoderLayer

    model = helpers.build_model("gqa")
    ids = torch.randint(1, 128, (2, 8))
    model.train()
    model.config.attention_dropout = 0.0
    assert model.supports_gradient_checkpointing
    if compat.IS_V5:
        from transformers.modeling_layers import GradientCheckpointingLayer

        assert issubclass(Qwen2MoeDecoderLayer, GradientCheckpointingLayer)
    calls = []
    grads = []
    for step in ("off", "on", "off again"):
        model.zero_grad()
        if step == "on":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.is_gradient_checkpointing and model.model.gradient_checkpointing
            # Count the checkpointed calls where they happen: in each layer on 5.x, in the model's loop on 4.x.
            owners = list(model.model.layers) if compat.IS_V5 else [model.model]
            for owner in owners:
                inner = owner._gradient_checkpointing_func
                owner._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
        elif step == "off again":
            model.gradient_checkpointing_disable()
            assert not model.is_gradient_checkpointing
            assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        out = model(ids, labels=ids, output_router_logits=True, use_cache=True)
        if step == "on":
            assert out.past_key_values is None  # the cache is turned off, as transformers does
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == len(model.model.layers)  # once per layer in the forward, none when off
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(grads[2][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_sequence_classification_pools_the_last_real_token():
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(num_labels=3))
    model = helpers.randomize_(Qwen2MoeForSequenceClassification(config), seed=2).eval()
    ids = torch.randint(1, 128, (2, 6))
    ids[1, 4:] = config.pad_token_id  # right padding
    with torch.no_grad():
        out = model(ids, labels=torch.tensor([0, 2]))
        alone = model(ids[1:, :4]).logits
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits[1:], alone, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_equal_input_ids():
    model = helpers.build_model("gqa")
    ids = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_attention_mask_of_the_wrong_length_is_refused():
    model = helpers.build_model("gqa")
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(1, 128, (2, 5)), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_never_imports_transformers_qwen2_moe():
    import subprocess
    import sys

    code = (
        "import sys, torch, qwen2_moe_hf\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "c = AutoConfig.for_model('qwen2_moe', **%r)\n"
        "m = AutoModelForCausalLM.from_config(c)\n"
        "m(torch.tensor([[1, 2, 3]]))\n"
        "bad = [n for n in sys.modules if n.startswith('transformers.models.qwen2_moe')]\n"
        "assert not bad, bad\n"
        "print('ok', type(m).__module__)\n" % (helpers.tiny_config_kwargs(),)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok qwen2_moe_hf.modeling_qwen2_moe" in result.stdout
    assert compat.TRANSFORMERS_VERSION is not None


def test_sliding_window_layers_see_only_the_window():
    """Layers typed "sliding_attention" attend to the last `sliding_window` keys; full layers to all."""
    kwargs = helpers.tiny_config_kwargs(use_sliding_window=True, sliding_window=3, max_window_layers=3)
    config = Qwen2MoeConfig(**kwargs)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    model = helpers.randomize_(Qwen2MoeForCausalLM(config), seed=0).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(torch.randint(1, 128, (1, 6)), output_attentions=True)
    sliding, full = out.attentions[0][0], out.attentions[1][0]
    assert sliding[:, 5, :3].abs().max() == 0 and sliding[:, 5, 3:].sum(-1).allclose(torch.ones(4))
    assert full[:, 5, :3].abs().max() > 0
