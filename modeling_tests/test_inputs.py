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
