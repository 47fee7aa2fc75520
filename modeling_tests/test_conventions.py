"""transformers' conventions for our classes, on both stacks: loading across classes (head from base, base from
head, a new head initialised with transformers' warning), `output_loading_info`, `ignore_mismatched_sizes`, where
strict loading still refuses, every head registered with its Auto class, and the token-classification and
question-answering heads equal to transformers 5.23's own."""

import json
import logging
import os

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from qwen2_moe_hf import (
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForSequenceClassification,
    Qwen2MoeForTokenClassification,
    Qwen2MoeModel,
    compat,
)
from qwen2_moe_hf.files import CheckpointError

import helpers

HEADS = {  # class -> (its Auto class, the head's tensor names)
    Qwen2MoeForCausalLM: (AutoModelForCausalLM, ["lm_head.weight"]),
    Qwen2MoeForSequenceClassification: (AutoModelForSequenceClassification, ["score.weight"]),
    Qwen2MoeForTokenClassification: (AutoModelForTokenClassification, ["score.weight", "score.bias"]),
    Qwen2MoeForQuestionAnswering: (AutoModelForQuestionAnswering, ["qa_outputs.weight", "qa_outputs.bias"]),
}


def _config(**overrides):
    return Qwen2MoeConfig(**helpers.tiny_config_kwargs(**overrides))


def _build(cls, seed=3, **overrides):
    torch.manual_seed(seed)
    return helpers.randomize_(cls(_config(**overrides)), seed).eval()


def _base_state(model):
    base = model if isinstance(model, Qwen2MoeModel) else model.model
    return {k: v.clone() for k, v in base.state_dict().items()}


def _assert_same_base(model, expected):
    got = _base_state(model)
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    model = _build(Qwen2MoeModel)
    path = str(tmp_path_factory.mktemp("base"))
    helpers.save_checkpoint(model, path)
    return path, _base_state(model)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Warnings on transformers' loading logger (which does not propagate to the root logger, so caplog misses
    them)."""
    logger = compat.transformers_loading_logger()
    handler = _Records()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_head_from_a_base_checkpoint_is_new_and_said_so(cls, base_checkpoint, transformers_warnings):
    path, base_state = base_checkpoint
    auto, head_keys = HEADS[cls]
    model, info = auto.from_pretrained(path, output_loading_info=True)
    assert type(model) is cls
    _assert_same_base(model, base_state)
    assert sorted(info["missing_keys"]) == sorted(head_keys)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for key in head_keys:  # initialised as transformers does: normal(0, initializer_range) weights, zero biases
        tensor = model.get_parameter(key)
        assert tensor.device.type == "cpu" and torch.isfinite(tensor).all()
        if key.endswith("bias"):
            assert torch.count_nonzero(tensor) == 0
        else:
            assert 0.2 * model.config.initializer_range < tensor.std() < 5 * model.config.initializer_range
    assert any(all(k in m for k in head_keys) and ("newly initialized" in m or "MISSING" in m)
               for m in transformers_warnings), transformers_warnings
    # Without asking for the info it loads the same, and computes.
    model = auto.from_pretrained(path)
    _assert_same_base(model, base_state)
    model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_base_and_other_heads_from_a_head_checkpoint(cls, tmp_path):
    model = _build(cls)
    model.save_pretrained(str(tmp_path))
    base = AutoModel.from_pretrained(str(tmp_path))
    assert type(base) is Qwen2MoeModel
    _assert_same_base(base, _base_state(model))
    for other in HEADS:
        if other is not cls:
            loaded = other.from_pretrained(str(tmp_path))
            _assert_same_base(loaded, _base_state(model))


def _drop_tensor(folder, key):
    """Remove one tensor from a saved checkpoint (its shard and the index), as a truncated upload would."""
    from safetensors.torch import load_file, save_file

    index_file = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            index = json.load(f)
        shard = index["weight_map"].pop(key)
        with open(index_file, "w") as f:
            json.dump(index, f)
    else:
        shard = "model.safetensors"
    tensors = load_file(os.path.join(folder, shard))
    del tensors[key]
    save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})


def test_a_checkpoint_of_this_class_without_its_head_is_refused(tmp_path):
    # config.json names Qwen2MoeForCausalLM: a missing lm_head is a hole in the checkpoint, not a new head.
    model = _build(Qwen2MoeForCausalLM)
    helpers.save_checkpoint(model, str(tmp_path))
    _drop_tensor(str(tmp_path), "lm_head.weight")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        Qwen2MoeForCausalLM.from_pretrained(str(tmp_path))
    # ... unless the caller asks for the loading info, which then reports it.
    loaded, info = Qwen2MoeForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert list(info["missing_keys"]) == ["lm_head.weight"]
    _assert_same_base(loaded, _base_state(model))


def test_a_missing_base_tensor_is_refused_even_for_a_new_head(base_checkpoint, tmp_path):
    import shutil

    path = str(tmp_path / "ckpt")
    shutil.copytree(base_checkpoint[0], path)
    expert = "layers.1.mlp.experts.2.up_proj.weight"
    _drop_tensor(path, expert)
    for cls in HEADS:
        with pytest.raises(CheckpointError, match=expert.replace(".", r"\.")):
            cls.from_pretrained(path)
    model, info = Qwen2MoeForCausalLM.from_pretrained(path, output_loading_info=True)
    # transformers 5.x names keys as the model does, 4.38 as the checkpoint does: either way, these two.
    assert sorted(k.removeprefix("model.") for k in info["missing_keys"]) == sorted([expert, "lm_head.weight"])
    assert torch.isfinite(model.model.layers[1].mlp.experts[2].up_proj.weight).all()


def test_ignore_mismatched_sizes_reinitialises_exactly_the_mismatched_head(tmp_path, transformers_warnings):
    model = _build(Qwen2MoeForSequenceClassification, num_labels=2)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"score\.weight"):
        Qwen2MoeForSequenceClassification.from_pretrained(str(tmp_path), num_labels=42)
    loaded, info = Qwen2MoeForSequenceClassification.from_pretrained(
        str(tmp_path), num_labels=42, ignore_mismatched_sizes=True, output_loading_info=True)
    assert loaded.score.weight.shape == (42, 64) and loaded.config.num_labels == 42
    assert [(k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]] == [("score.weight", (2, 64), (42, 64))]
    assert not info["missing_keys"]
    _assert_same_base(loaded, _base_state(model))
    assert any("score.weight" in m and ("shapes did not match" in m or "MISMATCH" in m)
               for m in transformers_warnings), transformers_warnings
    loaded(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_every_head_is_registered_and_round_trips(cls, tmp_path):
    auto, _ = HEADS[cls]
    model = _build(cls)
    assert type(auto.from_config(model.config)) is cls
    model.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["architectures"] == [cls.__name__]
    loaded = auto.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is cls
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        expected, got = model(ids), loaded(ids)
    for name in ("logits", "start_logits", "end_logits"):
        if name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_token_classification_loss_and_dropout():
    model = _build(Qwen2MoeForTokenClassification, num_labels=5, classifier_dropout=0.0)
    assert model.dropout.p == 0.0
    assert Qwen2MoeForTokenClassification(_config(num_labels=5)).dropout.p == 0.1
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[1, -100, 4, 0]])
    out = model(ids, labels=labels)
    keep = labels[0] != -100
    expected = torch.nn.functional.cross_entropy(out.logits[0][keep].float(), labels[0][keep])
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="labels: 5 at position"):
        model(ids, labels=torch.tensor([[1, 5, 0, 0]]))


def test_question_answering_loss_ignores_positions_past_the_end():
    model = _build(Qwen2MoeForQuestionAnswering)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model(ids, start_positions=torch.tensor([1, 99]), end_positions=torch.tensor([2, 3]))
    ce = torch.nn.functional.cross_entropy
    start = ce(out.start_logits[:1].float(), torch.tensor([1]))  # 99 clamps to 4 = ignored
    end = ce(out.end_logits.float(), torch.tensor([2, 3]))
    torch.testing.assert_close(out.loss, (start + end) / 2)


@pytest.mark.skipif(not compat.IS_V5, reason="transformers 4.38 has no qwen2_moe of its own to compare with")
@pytest.mark.parametrize("cls", [Qwen2MoeForTokenClassification, Qwen2MoeForQuestionAnswering],
                         ids=lambda c: c.__name__)
def test_heads_equal_transformers_own(cls, tmp_path):
    from transformers.models.qwen2_moe import modeling_qwen2_moe as builtin

    ours = _build(cls, num_labels=3, classifier_dropout=0.0)
    helpers.save_checkpoint(ours, str(tmp_path))
    theirs = getattr(builtin, cls.__name__).from_pretrained(str(tmp_path)).eval()
    assert not isinstance(theirs, cls)
    ids, mask, _ = helpers.parity_inputs(ours.config.vocab_size)
    kwargs = ({"labels": torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]] * 2)}
              if cls is Qwen2MoeForTokenClassification
              else {"start_positions": torch.tensor([5, 2]), "end_positions": torch.tensor([7, 30])})
    with torch.no_grad():
        expected, got = theirs(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    real = mask.bool()  # padded positions are undefined in both
    for name in ("logits", "start_logits", "end_logits"):
        if name in expected:
            err = helpers.row_error(got[name][real], expected[name][real])
            assert err < 1e-4, f"{name}: {err:.2e}"
    # The losses, on a batch without padding (a QA softmax runs over every position).
    ids[0, :4] = torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        expected, got = theirs(ids, **kwargs), ours(ids, **kwargs)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)


# Every scaled rope_type the installed transformers applies, with parameters that change the outputs at the test's
# lengths (the tiny config trains 16 positions here; the prompt runs to 40). A type missing here fails the test.
ROPE_CASES = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [1.0 + i for i in range(8)],
                 "original_max_position_embeddings": 16},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "proportional": {"factor": 2.0},
}


def _rope_model(rope_type, form="rope_parameters"):
    params = dict(ROPE_CASES[rope_type], rope_type=rope_type)
    if form == "rope_scaling":  # the 4.x spelling
        params = dict(ROPE_CASES[rope_type], type=rope_type)
    torch.manual_seed(0)
    config = _config(max_position_embeddings=16, rope_theta=10000.0, **{form: params})
    return helpers.randomize_(Qwen2MoeForCausalLM(config), 4).eval()


@pytest.mark.parametrize("rope_type", [t for t in compat.ROPE_TYPES if t != "default"])
def test_rope_scaling_is_applied(rope_type, tmp_path):
    assert rope_type in ROPE_CASES, f"no test case for rope_type {rope_type!r}"
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    plain = _rope_model(rope_type)
    plain.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    with torch.no_grad():
        unscaled = plain(ids).logits
        forms = [_rope_model(rope_type, form)(ids).logits for form in ("rope_parameters", "rope_scaling")]
    torch.testing.assert_close(forms[1], forms[0], rtol=0, atol=0)  # both spellings, one meaning
    assert helpers.row_error(forms[0], unscaled) > 1e-3, "scaling changed nothing"
    if not compat.IS_V5:
        return
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM as Builtin

    ours = _rope_model(rope_type)
    helpers.save_checkpoint(ours, str(tmp_path))
    theirs = Builtin.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        err = helpers.row_error(ours(ids).logits, theirs(ids).logits)
        assert err < 1e-4, f"{rope_type}: {err:.2e} from transformers' qwen2_moe"
        # Greedy decoding grows the sequence one position at a time past the trained length: the dynamic types
        # recompute their frequencies on every step, in both.
        prompt = ids[:, :12]
        kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert torch.equal(ours.generate(prompt, **kwargs), theirs.generate(prompt, **kwargs))


@pytest.mark.skipif(compat.IS_V5, reason="transformers 5.x applies every type it defines (the test above)")
def test_rope_types_4_38_does_not_apply_are_refused():
    with pytest.raises(ValueError, match=r"rope_scaling.*'linear', 'dynamic'.*'yarn'"):
        _config(rope_scaling={"type": "yarn", "factor": 4.0})


def test_rope_scaling_fields_are_checked():
    with pytest.raises(ValueError, match=r"rope_parameters\.factor: expected a number >= 1"):
        _config(rope_scaling={"type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match=r"rope_parameters\.factor"):
        _config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rope_scaling / rope_parameters rope_type"):
        _config(rope_parameters={"rope_type": "nope", "rope_theta": 1e4})


def _real_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.skipif(not compat.IS_V5, reason="transformers 4.38 has no attention registry; its eager and sdpa paths "
                    "are ours (test_modeling.py::test_eager_matches_sdpa_and_returns_attention_weights)")
@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_attention_implementations_from_transformers_registry(implementation):
    model = helpers.build_model("gqa")
    ids, mask, _ = helpers.parity_inputs(model.config.vocab_size)
    assert model.config._attn_implementation == "sdpa"
    expected = _real_logits(model, ids, mask)
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    assert all(layer.self_attn.config._attn_implementation == implementation for layer in model.model.layers)
    assert helpers.row_error(_real_logits(model, ids, mask), expected) < 1e-5


@pytest.mark.skipif(not compat.IS_V5, reason="transformers 4.38 has no attention registry (AttentionInterface)")
def test_a_registered_attention_function_plugs_in():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls = []

    def counted(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("qwen2_moe_hf_counted", counted)
    AttentionMaskInterface.register("qwen2_moe_hf_counted", sdpa_mask)  # the mask format it wants
    model = helpers.build_model("gqa")
    ids, mask, _ = helpers.parity_inputs(model.config.vocab_size)
    expected = _real_logits(model, ids, mask)
    model.set_attn_implementation("qwen2_moe_hf_counted")
    assert helpers.row_error(_real_logits(model, ids, mask), expected) < 1e-6
    heads, kv_heads, head_dim = 4, 2, 16
    assert calls == [(i, (2, heads, 12, head_dim), (2, kv_heads, 12, head_dim)) for i in range(3)]


def test_class_conventions():
    from transformers import GenerationMixin

    assert GenerationMixin in Qwen2MoeForCausalLM.__bases__
    for cls in list(HEADS) + [Qwen2MoeModel]:
        assert cls.base_model_prefix == "model" and cls._no_split_modules == ["Qwen2MoeDecoderLayer"]
        assert cls.supports_gradient_checkpointing and cls._supports_sdpa
        assert not cls(_config()).can_generate() or cls is Qwen2MoeForCausalLM
    assert Qwen2MoeForCausalLM(_config()).can_generate()


def test_tied_embeddings_share_one_tensor_through_save_and_load(tmp_path):
    model = _build(Qwen2MoeForCausalLM, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(str(tmp_path))
    loaded = Qwen2MoeForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    untied = _build(Qwen2MoeForCausalLM, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings(tied):
    model = _build(Qwen2MoeForCausalLM, tie_word_embeddings=tied)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
    assert model.get_input_embeddings() is model.model.embed_tokens
    model.resize_token_embeddings(200)
    assert model.config.vocab_size == 200
    assert model.model.embed_tokens.weight.shape == (200, 64) and model.lm_head.weight.shape == (200, 64)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        after = model(torch.tensor([[5, 6, 7, 199]])).logits
        torch.testing.assert_close(model(ids).logits[..., :128], before, rtol=1e-5, atol=1e-5)
    assert after.shape == (1, 4, 200)


@pytest.mark.parametrize("cls", [Qwen2MoeModel] + list(HEADS), ids=lambda c: c.__name__)
def test_output_flags_and_return_dict(cls):
    model = _build(cls)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        as_tuple = model(ids, output_attentions=True, output_hidden_states=True, return_dict=False)
        plain = model(ids)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and all(h.shape == (2, 4, 64) for h in out.hidden_states)
    assert len(out.attentions) == layers and all(a.shape == (2, 4, 4, 4) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 4))  # rows of softmax weights
    assert plain.hidden_states is None and plain.attentions is None
    assert isinstance(as_tuple, tuple)
    first = [v for v in out.to_tuple() if v is not None][0]
    torch.testing.assert_close(as_tuple[0], first, rtol=0, atol=0)


@pytest.mark.skipif(not compat.IS_V5, reason="continuous batching and paged attention are transformers 5.x's")
def test_continuous_batching_on_paged_attention_equals_generate():
    # generate_batch packs the prompts into one row, hands the attention function a paged cache and a prepared
    # 4-D mask through the model's keyword arguments: they must reach it.
    from transformers import GenerationConfig

    model = helpers.build_model("gqa")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6,
                                   do_sample=False)[0, len(p):].tolist() for p in prompts]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    got = sorted(outputs.values(), key=lambda o: int(o.request_id.split("_")[-1]))
    assert [list(o.prompt_ids) for o in got] == prompts
    assert [list(o.generated_tokens) for o in got] == expected


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
@pytest.mark.parametrize("length", [10, 16, 40])
def test_our_4_38_rope_scaling_equals_transformers(rope_type, length):
    """The linear and dynamic RoPE written for 4.38 (compat.py) against transformers' own: 5.x's init functions
    where installed, else 4.38's Llama rotary classes (the same math, before the RoPE registry)."""
    from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding

    config = _config(max_position_embeddings=16, rope_theta=10000.0,
                     rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.5})
    x = torch.zeros(1, dtype=torch.float32)
    positions = torch.arange(length)[None]
    if compat.IS_V5:
        init = {"linear": compat._linear_rope, "dynamic": compat._dynamic_rope}[rope_type]
        seq_len = length if rope_type == "dynamic" else None
        ours, theirs = init(config, None, seq_len=seq_len), compat.ROPE_INIT_FUNCTIONS[rope_type](
            config, None, seq_len=seq_len)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0)
        assert ours[1] == theirs[1] == 1.0
        return
    from transformers.models.llama import modeling_llama

    cls = {"linear": modeling_llama.LlamaLinearScalingRotaryEmbedding,
           "dynamic": modeling_llama.LlamaDynamicNTKScalingRotaryEmbedding}[rope_type]
    theirs = cls(config.head_dim, max_position_embeddings=16, base=10000.0, scaling_factor=2.5)
    cos, sin = theirs(x, positions)
    ours = Qwen2MoeRotaryEmbedding(config)(x, positions)
    torch.testing.assert_close(ours[0], cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], sin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope_type", ["default", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_rope_table_gives_what_each_call_computes(rope_type, dtype):
    """cos / sin looked up in the rotary embedding's table (default and linear RoPE) against computing them for the
    call's positions: a prompt, decode steps across the table's growth, out-of-order batches, positions past the
    table's limit and negative ones (computed per call); a changed config is read at once; nothing in state_dict."""
    from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding

    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **({"factor": 2.0} if rope_type == "linear" else {})}
    emb = Qwen2MoeRotaryEmbedding(_config(rope_theta=10000.0, rope_parameters=rope))
    x = torch.zeros(1, dtype=dtype)
    tol = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)  # one ulp: the same ops, batched

    def check(positions):
        got, want = emb(x, positions), emb._cos_sin(x, positions)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape == (*positions.shape, emb.config.head_dim)
            torch.testing.assert_close(g, w, **tol)

    check(torch.arange(10)[None])
    table = emb.__dict__["_table"][1]
    for p in (10, 11, 255, 256, 700):  # 256 and 700 grow the table
        check(torch.tensor([[p]]))
    assert emb.__dict__["_table"][1].shape[0] == 1024 and table.shape[0] == 256
    check(torch.tensor([[5, 3, 900, 0], [1, 2, 3, 4]]))
    check(torch.tensor([[Qwen2MoeRotaryEmbedding.TABLE_MAX + 5]]))
    check(torch.tensor([[-3, 4]]))
    assert emb.__dict__["_table"][1].shape[0] == 1024  # neither of those two went into the table
    emb.config.rope_parameters["rope_theta"] = 500.0  # read at once: a new table
    check(torch.tensor([[7]]))
    want = Qwen2MoeRotaryEmbedding(_config(rope_theta=500.0, rope_parameters=dict(rope, rope_theta=500.0)))(
        x, torch.tensor([[7]]))
    assert all(torch.equal(a, b) for a, b in zip(emb(x, torch.tensor([[7]])), want))
    assert dict(emb.state_dict()) == {}


def test_outputs_built_without_the_constructors_checks_are_the_constructors():
    """compat.model_output(cls, **fields) against cls(**fields): the same class, items (the fields that are not None,
    in order), attributes, tuple form, indexing and pickling; names it does not know raise as the constructor does."""
    import pickle

    from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

    h, logits, loss = torch.randn(1, 2, 4), torch.randn(1, 2, 8), torch.tensor(0.5)
    cache, router = compat.DynamicCache(), (torch.randn(2, 3),)
    cases = [(MoeModelOutputWithPast, dict(last_hidden_state=h, past_key_values=cache, hidden_states=None,
                                           attentions=None, router_logits=())),
             (MoeModelOutputWithPast, dict(last_hidden_state=h, hidden_states=(h, h), router_logits=router)),
             (MoeCausalLMOutputWithPast, dict(loss=None, aux_loss=None, logits=logits, past_key_values=cache,
                                              hidden_states=None, attentions=None, router_logits=None)),
             (MoeCausalLMOutputWithPast, dict(loss=loss, aux_loss=loss, logits=logits, router_logits=router)),
             (MoeCausalLMOutputWithPast, dict(loss=None, logits=None))]  # nothing set: the constructor's case
    for cls, fields in cases * 2:  # the second time round each class is known
        want, got = cls(**fields), compat.model_output(cls, **fields)
        assert type(got) is cls
        assert list(got.keys()) == list(want.keys())
        assert all(a is b for a, b in zip(got.values(), want.values()))
        assert all(getattr(got, name) is getattr(want, name) for name in cls.__dataclass_fields__)
        assert len(got.to_tuple()) == len(want.to_tuple())
        assert all(a is b for a, b in zip(got.to_tuple(), want.to_tuple()))
        if want.keys():
            first = next(iter(want.keys()))
            assert got[0] is want[0] and got[first] is want[first]
        again = pickle.loads(pickle.dumps(got))
        assert type(again) is cls and list(again.keys()) == list(want.keys())
    with pytest.raises(TypeError):
        compat.model_output(MoeModelOutputWithPast, last_hidden_state=h, logits=logits)


def test_plugin_warnings_follow_transformers_verbosity(caplog):
    """`transformers.logging.set_verbosity_error()` silences our warnings too; the default verbosity keeps them."""
    from transformers.utils import logging as hf_logging

    plugin = logging.getLogger("qwen2_moe_hf")
    before = hf_logging.get_verbosity()
    try:
        with caplog.at_level(logging.WARNING, logger="qwen2_moe_hf"):
            hf_logging.set_verbosity_warning()
            plugin.warning("shown at transformers' default verbosity")
            hf_logging.set_verbosity_error()
            plugin.warning("hidden once transformers is told to show errors only")
            plugin.error("errors still shown")
    finally:
        hf_logging.set_verbosity(before)
    messages = [r.getMessage() for r in caplog.records if r.name == "qwen2_moe_hf"]
    assert messages == ["shown at transformers' default verbosity", "errors still shown"]


def test_loading_progress_bar_follows_transformers_switch(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    path = helpers.save_checkpoint(helpers.build_model("gqa"), str(tmp_path / "ckpt"))
    AutoModelForCausalLM.from_pretrained(path)
    assert "Loading weights" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        AutoModelForCausalLM.from_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()
    assert "Loading weights" not in capsys.readouterr().err
