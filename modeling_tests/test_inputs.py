"""Bad inputs give clear errors (or a documented warning), and the model stays usable afterwards."""

import logging

import pytest
import torch

from helpers import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("gqa", seed=5)


@pytest.mark.parametrize("bad_id", [128, 10**6, -1])
def test_token_id_outside_the_vocabulary_is_named(model, bad_id):
    ids = torch.tensor([[5, 6, bad_id, 7]])
    with pytest.raises(ValueError, match=rf"token id {bad_id} at position \[0, 2\] is outside the vocabulary "
                                         r"\[0, 128\)"):
        model(ids)
    with torch.no_grad():  # still usable
        assert torch.isfinite(model(torch.tensor([[5, 6, 8, 7]])).logits).all()


def test_generate_rejects_bad_ids_too(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, 500]]), max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_empty_input_is_an_error(model):
    with pytest.raises(ValueError, match="empty sequence"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_beyond_max_position_embeddings_warns(model, caplog):
    ids = torch.randint(1, 128, (1, model.config.max_position_embeddings + 3))
    with caplog.at_level(logging.WARNING, logger="qwen2_moe_hf"), torch.no_grad():
        out = model(ids).logits
    assert "exceeds config.max_position_embeddings" in caplog.text
    assert torch.isfinite(out).all()


def _overflowing_fp16(model):
    """The model in float16 with one layer's shared expert scaled so the residual stream leaves fp16's range."""
    model = model.half()
    with torch.no_grad():
        model.model.layers[0].mlp.shared_expert.up_proj.weight.mul_(300)
        model.model.layers[0].mlp.shared_expert.down_proj.weight.mul_(300)
    return model


def test_fp16_overflow_stays_finite_and_no_worse_than_transformers():
    from qwen2_moe_hf import compat

    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    ours = _overflowing_fp16(build_model("gqa", seed=5))
    with torch.no_grad():
        logits = ours(ids).logits
        residual = ours(ids, output_hidden_states=True).hidden_states[1]
    assert torch.isfinite(residual).all() and residual.abs().max() > 6e4  # it did reach fp16's limit
    assert torch.isfinite(logits).all()
    if not compat.HAS_BUILTIN_QWEN2_MOE:
        pytest.skip("transformers 4.38 has no qwen2_moe to compare with (ours stayed finite)")
    from transformers.models.qwen2_moe import modeling_qwen2_moe as hf

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        build_model("gqa", seed=5).save_pretrained(folder)
        theirs = _overflowing_fp16(hf.Qwen2MoeForCausalLM.from_pretrained(folder))
    with torch.no_grad():
        their_logits = theirs(ids).logits
    assert not torch.isfinite(their_logits).all()  # transformers' own model overflows to inf / NaN here
    assert torch.isfinite(logits).sum() > torch.isfinite(their_logits).sum()


@pytest.mark.parametrize("ids, needle", [
    (torch.zeros(0, 5, dtype=torch.long), r"input_ids: empty batch \(shape \[0, 5\]\)"),
    (torch.tensor([5, 6, 7]), r"input_ids: expected integer token ids of shape \[batch, sequence\]"),
    (torch.ones(1, 2, 3, dtype=torch.long), r"input_ids: expected integer token ids"),
    (torch.tensor([[5.0, 6.0]]), r"input_ids: expected integer token ids"),
])
def test_malformed_input_ids_are_named(model, ids, needle):
    with pytest.raises(ValueError, match=needle):
        model(ids)


def test_malformed_inputs_embeds_are_named(model):
    hidden = model.config.hidden_size
    with pytest.raises(ValueError, match=r"inputs_embeds: empty batch"):
        model(inputs_embeds=torch.zeros(0, 3, hidden))
    with pytest.raises(ValueError, match=rf"inputs_embeds: expected shape \[batch, sequence, hidden_size={hidden}\]"):
        model(inputs_embeds=torch.zeros(1, 3, hidden + 1))


@pytest.mark.parametrize("positions", [
    torch.arange(4),  # 1-D
    torch.arange(3)[None],  # too short
    torch.arange(4).expand(3, 4),  # batch 3 for a batch of 2
    torch.arange(4.0)[None],  # floats
])
def test_position_ids_of_the_wrong_shape_are_named(model, positions):
    with pytest.raises(ValueError, match=r"position_ids: expected integer positions of shape \[batch=2"):
        model(torch.randint(1, 128, (2, 4)), position_ids=positions)


def test_position_ids_may_broadcast_over_the_batch(model):
    ids = torch.randint(1, 128, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=torch.arange(4)[None]).logits, model(ids).logits)


@pytest.mark.parametrize("bad", [128, -5])
def test_labels_outside_the_vocabulary_are_named(model, bad):
    ids = torch.randint(1, 128, (2, 5))
    labels = ids.clone()
    labels[0, 0] = -100  # ignored: fine
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"labels: {bad} at position \[1, 3\] is outside the vocabulary \[0, 128\)"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match=r"labels: expected shape \[2, 5\], got \[2, 4\]"):
        model(ids, labels=ids[:, :4])
    labels[1, 3] = 7
    assert torch.isfinite(model(ids, labels=labels).loss)


def test_sequence_classification_checks_padding_and_labels():
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForSequenceClassification

    import helpers

    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(pad_token_id=None, num_labels=3))
    model = Qwen2MoeForSequenceClassification(config).eval()
    ids = torch.randint(1, 128, (2, 6))
    # As transformers: without pad_token_id the last real token of a padded batch cannot be found.
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))
    assert model(ids[:1]).logits.shape == (1, 3)
    config.pad_token_id = 0
    with pytest.raises(ValueError, match=r"labels: 3 at position \[1\] is outside the labels \(num_labels\) \[0, 3\)"):
        model(ids, labels=torch.tensor([0, 3]))
    assert torch.isfinite(model(ids, labels=torch.tensor([0, 2])).loss)
