"""A decode step of one sequence on CPU runs each decoder layer in one call (moe/decode_layer.py, the extension's
decode_layer): the same ops in the same order as the modules, so greedy generate gives the same tokens, the same
logits bit for bit and the same cache; and wherever the modules would compute anything else (hooks, replaced
modules, attention weights, gradients, other caches, dtypes or backends, batches), the lane stands aside."""

import pytest
import torch

from qwen2_moe_hf import compat
from qwen2_moe_hf import modeling_qwen2_moe as modeling
from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops
from qwen2_moe_hf.moe import decode_layer
from qwen2_moe_hf.moe.dense import mask_fits

import helpers

pytestmark = [
    pytest.mark.skipif(compat.AppendingLayer is None,
                       reason="transformers 4.x: the lane writes into 5.x DynamicCache layers' buffers"),
    pytest.mark.skipif(not load_cpu_ops()[0], reason="CPU ops unavailable"),
]


@pytest.fixture
def lane(monkeypatch):
    """Counts the layer steps the lane runs (`calls`; `model_calls`: the steps that ran with every layer in one
    call); `lane.off()` makes every layer run its modules."""
    class Lane:
        calls = 0
        model_calls = 0

        def off(self):
            monkeypatch.setattr(modeling.Qwen2MoeDecoderLayer, "_decode_call", lambda self, *a, **k: None)

        def on(self):
            monkeypatch.setattr(modeling.Qwen2MoeDecoderLayer, "_decode_call", decode_call)

    decode_call = modeling.Qwen2MoeDecoderLayer._decode_call
    counter = Lane()
    run = decode_layer.run_steps

    def counting(steps, *args, **kwargs):
        counter.calls += len(steps)
        counter.model_calls += len(steps) > 1
        return run(steps, *args, **kwargs)

    monkeypatch.setattr(decode_layer, "run_steps", counting)
    return counter


def _generate(model, ids, **kwargs):
    kwargs = dict(dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True), **kwargs)
    return model.generate(ids, **kwargs)


def _same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _same_cache(a, b):
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def _both(model, ids, lane, **kwargs):
    lane.on()
    lane.calls = 0
    fused = _generate(model, ids, **kwargs)
    calls = lane.calls
    lane.off()
    modules = _generate(model, ids, **kwargs)
    assert lane.calls == calls
    return fused, modules, calls


IDS = torch.tensor([[5, 9, 2, 7, 1, 3, 11]])


def _fp16_dense_takes_lane():
    """Whether full-precision fp16 layers take the lane on this build: their q/k/v/o need DecodeLinear's fp16 GEMV,
    the AVX-512 lanes kernel; on other builds (AVX2, generic) such layers run their modules."""
    return cpu_module().dense_row_lanes()


@pytest.mark.parametrize("preset", ["gqa", "top3_of_8_wide_heads", "sparse_step2_mha_norm", "mlp_only_mqa_norm"])
@pytest.mark.parametrize("kind", ["bf16", "fp16", "int4-bf16", "int4-fp16"])
def test_generate_is_the_modules_bit_for_bit(preset, kind, lane):
    model = helpers.build_model(preset)
    if kind.startswith("int4"):
        from qwen2_moe_hf.bench import int4_copy

        model = int4_copy(model, attention=True, blocked=True)
    model = model.to(torch.float16 if kind.endswith("fp16") else torch.bfloat16)
    fused, modules, calls = _both(model, IDS, lane)
    moe_layers = sum(isinstance(layer.mlp, modeling.Qwen2MoeSparseMoeBlock) for layer in model.model.layers)
    if kind == "fp16" and not _fp16_dense_takes_lane():
        moe_layers = 0  # no layer takes the lane: the modules against the modules
    assert calls == 5 * moe_layers  # every decode step (6 tokens: the prompt's step gives the first) of each
    # every layer in one call per step where every layer takes the lane (dense-MLP layers do not)
    assert lane.model_calls == (5 if moe_layers == len(model.model.layers) else 0)
    _same(fused, modules)
    _same_cache(fused, modules)


def test_a_hook_on_a_decoder_layer_runs_and_keeps_the_one_call_off(lane):
    """With a forward hook (or pre-hook) on one decoder layer, every layer is called on its own (each still takes its
    lane), so the hook runs on every step and sees the layer's output; removed, the layers run in one call again."""
    model = helpers.build_model("gqa").bfloat16()
    seen = []
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        lane.calls = lane.model_calls = 0
        hook = getattr(model.model.layers[1], register)(lambda module, *args: seen.append(module))
        fused, modules, calls = _both(model, IDS, lane)
        hook.remove()
        assert calls == 5 * 3 and lane.model_calls == 0
        assert len(seen) == 2 * 6  # both runs, every forward (the prompt's and 5 decode steps)
        seen.clear()
        _same(fused, modules)
        _same_cache(fused, modules)
    lane.calls = lane.model_calls = 0
    _both(model, IDS, lane)
    assert lane.model_calls == 5


def test_the_final_norm_joins_the_call_only_as_its_module_would_compute(lane, monkeypatch):
    """The model's final norm is applied in the layers' one call (no module call); with a hook on it, or its forward
    replaced, the module runs as before. The tokens, logits and cache are the modules' bit for bit either way."""
    model = helpers.build_model("gqa").bfloat16()
    norm_calls = []
    original = modeling.Qwen2MoeRMSNorm.forward

    def counted(self, x):
        norm_calls.append(self)
        return original(self, x)

    monkeypatch.setattr(modeling.Qwen2MoeRMSNorm, "forward", counted)
    final = model.model.norm

    def final_calls():
        n = sum(m is final for m in norm_calls)
        norm_calls.clear()
        return n

    lane.on()
    _generate(model, IDS)
    assert final_calls() == 1 and lane.model_calls == 5  # the prompt's forward only; its 5 decode steps: in the call
    seen = []
    hook = final.register_forward_hook(lambda module, args, out: seen.append(out))
    lane.model_calls = 0
    fused, modules, _ = _both(model, IDS, lane)
    hook.remove()
    assert lane.model_calls == 5 and len(seen) == 2 * 6 and final_calls() == 2 * 6
    _same(fused, modules)
    _same_cache(fused, modules)
    final.forward = counted.__get__(final)
    lane.model_calls = 0
    fused, modules, _ = _both(model, IDS, lane)
    assert lane.model_calls == 5 and final_calls() == 2 * 6
    _same(fused, modules)


@pytest.mark.parametrize("kind", ["fp16", "int4-fp16"])
def test_fp16_sums_past_fp16s_range_are_clamped_as_the_modules_do(lane, kind):
    """The lane's residual sums (plain loops) round to fp16 and then clamp as the modules' clamp_fp16(residual +
    hidden_states) does: with hidden states at +-60000 and a large o_proj, some sums pass fp16's range (inf before
    the clamp) and come out at the clamp's bound, bit for bit as in the modules. The GPTQ model takes the lane on
    every build; the full-precision one where its fp16 projections do."""
    if kind == "fp16" and not _fp16_dense_takes_lane():
        pytest.skip("fp16 dense projections take the lane only with the AVX-512 lanes kernel (this build has none)")
    model = helpers.build_model("gqa")
    if kind == "int4-fp16":
        from qwen2_moe_hf.bench import int4_copy

        model = int4_copy(model, attention=True, blocked=True)
    model = model.half()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.where(torch.rand(emb.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -6e4, 6e4))
        for layer in model.model.layers:
            o_proj = layer.self_attn.o_proj
            (o_proj.scales if kind == "int4-fp16" else o_proj.weight).mul_(2000)
    clamped = []
    handles = [layer.register_forward_hook(lambda m, a, out: clamped.append(out[0].abs().max().item()))
               for layer in model.model.layers]
    _generate(model, IDS)  # hooks: the modules
    for h in handles:
        h.remove()
    assert max(clamped) == float(torch.tensor(65504.0 - 1000.0).half())  # the clamp's bound, 64512 in fp16
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * len(model.model.layers)
    _same(fused, modules)
    _same_cache(fused, modules)


def test_the_lane_writes_the_cache_as_the_modules_do_through_regrowth(lane, monkeypatch):
    """With room for 2 more positions per buffer, a generate of 12 regrows the buffers on the lane's steps."""
    monkeypatch.setattr(compat, "KV_SPARE", 2)
    model = helpers.build_model("gqa").bfloat16()
    fused, modules, calls = _both(model, IDS, lane, max_new_tokens=12, min_new_tokens=12)
    assert calls == 11 * 3
    _same(fused, modules)
    _same_cache(fused, modules)


def _no_lane(model, ids, lane, **kwargs):
    fused, modules, calls = _both(model, ids, lane, **kwargs)
    assert calls == 0
    _same(fused, modules)


def test_hooks_and_replaced_modules_keep_the_modules(lane):
    model = helpers.build_model("gqa").bfloat16()
    seen = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 2 and len(seen) == 2 * 6  # layer 1 ran its modules (and the hook) on every step, both runs
    _same(fused, modules)
    handle.remove()
    pre = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: None)
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 2
    pre.remove()
    layer = model.model.layers[2]
    layer.self_attn.o_proj = helpers.Scaled(layer.self_attn.o_proj)  # a PEFT-style wrapper
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 2
    _same(fused, modules)
    layer.self_attn.o_proj = layer.self_attn.o_proj.base
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    _same(fused, modules)


def test_hooks_on_the_experts_run_and_their_removal_brings_the_lane_back(lane):
    """Hooks registered after the plans were built, on every routed expert's down_proj of layer 1 and on layer 0's
    shared expert's up_proj (modules the lane computes without calling): those layers run their modules, the hooks
    see what they see there; removed, every layer takes the lane again."""
    model = helpers.build_model("gqa").bfloat16()
    _, _, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    seen = []
    handles = [expert.down_proj.register_forward_hook(lambda m, i, o: seen.append(("routed", o.float().sum())))
               for expert in model.model.layers[1].mlp.experts]
    handles.append(model.model.layers[0].mlp.shared_expert.up_proj.register_forward_pre_hook(
        lambda m, args: seen.append(("shared", args[0].float().sum()))))
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 1  # layer 2 only
    _same(fused, modules)
    half = len(seen) // 2
    assert seen[:half] == seen[half:] and sum(kind == "shared" for kind, _ in seen[:half]) == 6
    assert any(kind == "routed" for kind, _ in seen[:half])
    for handle in handles:
        handle.remove()
    seen.clear()
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3 and not seen
    _same(fused, modules)


def test_a_wrapped_expert_keeps_the_modules_until_unwrapped(lane):
    """A plan without the lane because of a wrapped expert projection (PEFT-style) watches the experts' slots: once
    the wrapper is gone, the next step takes the lane again."""
    model = helpers.build_model("gqa").bfloat16()
    expert = model.model.layers[1].mlp.experts[0]
    expert.gate_proj = helpers.Scaled(expert.gate_proj)
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 2
    _same(fused, modules)
    expert.gate_proj = expert.gate_proj.base
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    _same(fused, modules)


def test_replaced_and_changed_tensors_are_read(lane):
    """A tensor replaced after the lane's pack was built, or changed in place, is what the next step reads."""
    model = helpers.build_model("gqa").bfloat16()
    before = _generate(model, IDS)
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.detach() * -2)
    model.model.layers[1].post_attention_layernorm.weight.data = torch.full_like(
        model.model.layers[1].post_attention_layernorm.weight, 0.5)
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.bias.mul_(3)
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    _same(fused, modules)
    assert not all(torch.equal(x, y) for x, y in zip(before.logits, fused.logits))


def test_changed_gptq_tensors_are_read(lane):
    """The lane's packs keep each layer's int4 projections and experts prepared between steps: GPTQ tensors changed
    in place, or through `.data = ...` (no new object, no new version), after a first generate are what the next
    one reads, as a fresh copy of the model reads them."""
    import copy

    from qwen2_moe_hf.bench import int4_copy
    from qwen2_moe_hf.gptq.format import GPTQSpec

    model = int4_copy(helpers.build_model("top3_of_8_wide_heads"), GPTQSpec(bits=4, group_size=32, sym=True),
                      attention=True, blocked=True).bfloat16()
    before = _generate(model, IDS)
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.q_proj.g_idx.copy_(attn.q_proj.g_idx.max() - attn.q_proj.g_idx)  # the groups in reverse order
        attn.o_proj.scales.data = attn.o_proj.scales * -1
        for expert in model.model.layers[1].mlp.experts:
            expert.up_proj.g_idx.copy_(expert.up_proj.g_idx.max() - expert.up_proj.g_idx)
        model.model.layers[2].mlp.shared_expert.down_proj.qweight.data = torch.randint_like(
            model.model.layers[2].mlp.shared_expert.down_proj.qweight, -2**31, 2**31 - 1)
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    fresh = _generate(copy.deepcopy(model), IDS)
    _same(fused, fresh)
    _same(modules, fresh)
    assert not all(torch.equal(x, y) for x, y in zip(before.logits, fused.logits))


def test_other_calls_keep_the_modules(lane):
    model = helpers.build_model("gqa").bfloat16()
    _no_lane(model, torch.cat([IDS, IDS.flip(1)]), lane)  # a batch of two
    _no_lane(model, IDS, lane, output_attentions=True)
    with torch.no_grad():
        cache = model(IDS, use_cache=True).past_key_values
    step = model(IDS[:, :1], past_key_values=cache, use_cache=True)  # autograd on (generate turns it off)
    assert lane.calls == 0 and step.logits.requires_grad
    _no_lane(model, IDS, lane, cache_implementation="static")
    model.config.moe_backend = "torch"
    _no_lane(model, IDS, lane)
    model.config.moe_backend = None
    model.config._attn_implementation = "eager"
    _no_lane(model, IDS, lane)
    model.config._attn_implementation = "sdpa"  # back: the lane again
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:  # a global hook or a function mode (decode_layer.prepare's checks): no layer takes the lane
        _no_lane(model, IDS, lane)
    finally:
        hook.remove()

    class Passing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        _no_lane(model, IDS, lane)
    _no_lane(model.float(), IDS, lane)  # float32: DecodeLinear keeps torch's own Linear there


def test_changed_attributes_are_read(lane):
    model = helpers.build_model("gqa").bfloat16()
    _generate(model, IDS)
    model.model.layers[0].input_layernorm.variance_epsilon = 0.5
    model.model.layers[1].mlp.top_k = 1
    model.model.layers[2].self_attn.scaling = 0.1
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    _same(fused, modules)


def test_converted_and_copied_models_plan_again(lane):
    """.to() converts tensors in place (a plan's tensors would keep the old dtype): the layers drop their plans;
    deepcopy and pickle give models that plan their own."""
    import copy
    import pickle

    model = helpers.build_model("gqa").bfloat16()
    first = _generate(model, IDS)
    model.float()  # bf16 -> fp32 -> bf16 is exact
    assert all("_decode_plan" not in layer.__dict__ for layer in model.model.layers)
    _generate(model, IDS)
    model.bfloat16()
    lane.calls = 0
    _same(first, _generate(model, IDS))
    assert lane.calls == 5 * 3
    model.half()
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == (5 * 3 if _fp16_dense_takes_lane() else 0)
    _same(fused, modules)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(layer.__dict__.get("_decode_plan") is None for layer in clone.model.layers)
        _same(fused, _generate(clone, IDS))


def test_a_gptq_kernel_switched_to_torch_keeps_the_modules(lane, monkeypatch):
    """4-bit projections asked per call: with their torch kernel chosen (the environment switch), the modules run."""
    from qwen2_moe_hf.bench import int4_copy
    from qwen2_moe_hf.gptq import linear as gptq_linear

    model = int4_copy(helpers.build_model("gqa"), attention=True, blocked=True).bfloat16()
    _generate(model, IDS)
    monkeypatch.setenv(gptq_linear.ENV_KERNEL, "torch")
    _no_lane(model, IDS, lane)
    monkeypatch.delenv(gptq_linear.ENV_KERNEL)
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 3
    _same(fused, modules)


def test_train_mode_keeps_the_modules(lane):
    model = helpers.build_model("gqa").bfloat16()
    model.model.layers[1].train()
    fused, modules, calls = _both(model, IDS, lane)
    assert calls == 5 * 2
    _same(fused, modules)


def test_prepare_declines_what_the_modules_would_compute_otherwise():
    model = helpers.build_model("gqa").bfloat16()
    layer = model.model.layers[0]
    kinds = modeling._DECODE_KINDS
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    cos = torch.randn(1, 1, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert decode_layer.prepare(layer, x, (cos, cos), {}, kinds) is not None
        assert decode_layer.prepare(layer, x.repeat(1, 2, 1), (cos, cos), {}, kinds) is None  # two positions
        assert decode_layer.prepare(layer, x, (cos.float(), cos.float()), {}, kinds) is None
        assert decode_layer.prepare(layer, x, (cos.repeat(1, 2, 1), cos.repeat(1, 2, 1)), {}, kinds) is None
        assert decode_layer.prepare(layer, x, (cos, cos), {"softcap": 30.0}, kinds) is None
        assert decode_layer.prepare(layer, x.double(), (cos, cos), {}, kinds) is None
        layer.self_attn.sliding_window = 4
        assert decode_layer.prepare(layer, x, (cos, cos), {}, kinds) is None
        layer.self_attn.sliding_window = None
        plan = decode_layer.prepare(layer, x, (cos, cos), {}, kinds).plan
        assert decode_layer.prepare(layer, x, (cos, cos), {}, kinds).plan is plan  # kept while nothing changes
        layer.input_layernorm.variance_epsilon = 1e-3  # an attribute the plan holds: planned again
        again = decode_layer.prepare(layer, x, (cos, cos), {}, kinds).plan
        assert again is not plan and decode_layer.prepare(layer, x, (cos, cos), {}, kinds).plan is again
        layer.self_attn.training = True
        assert decode_layer.prepare(layer, x, (cos, cos), {}, kinds) is None
        layer.self_attn.training = False
        layer.mlp.top_k = 1
        assert decode_layer.prepare(layer, x, (cos, cos), {}, kinds).plan.top_k == 1
    assert mask_fits(None, 5)
    assert mask_fits(torch.ones(1, 1, 1, 5, dtype=torch.bool), 5)
    assert not mask_fits(torch.ones(1, 1, 1, 4, dtype=torch.bool), 5)
    assert not mask_fits(torch.ones(1, 5, dtype=torch.bool), 5)


def test_a_failing_step_leaves_the_cache_as_it_was(lane, monkeypatch):
    """An error inside the one call (here a bad router weight) raises, and the cache still holds what it held."""
    model = helpers.build_model("gqa").bfloat16()
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        cache = out.past_key_values
        held = [layer.keys.clone() for layer in cache.layers]
        model.model.layers[0].mlp.gate.weight.data = torch.zeros(6, 63, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="router_weight"):
            model(IDS[:, :1], past_key_values=cache, use_cache=True)
    assert lane.calls == 3 and lane.model_calls == 1  # the three layers' steps in one call; the first raised
    assert all(torch.equal(layer.keys, h) for layer, h in zip(cache.layers, held))


def test_the_cache_layer_is_taken_only_on_the_cpu():
    """decode_kv_layer hands out (and makes appending) only initialized CPU layers of a plain DynamicCache."""
    cache = compat.DynamicCache()
    assert compat.decode_kv_layer(cache, 0) is None  # no layer yet
    states = torch.zeros(1, 2, 3, 4)
    cache.update(states, states, 0)
    cache.update(states.to("meta"), states.to("meta"), 1)
    assert compat.decode_kv_layer(cache, 1) is None and type(cache.layers[1]) is not compat.AppendingLayer
    assert compat.decode_kv_layer(cache, 0) is cache.layers[0] and type(cache.layers[0]) is compat.AppendingLayer
    assert compat.decode_kv_layer(cache, 2) is None
    assert compat.decode_kv_layer(None, 0) is None
    compat.APPEND_KV_IN_PLACE = False
    try:
        assert compat.decode_kv_layer(cache, 0) is None
    finally:
        compat.APPEND_KV_IN_PLACE = True
