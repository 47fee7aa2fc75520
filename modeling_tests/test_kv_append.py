"""Decode steps on CPU append their keys and values in place (compat.AppendingLayer) instead of transformers'
DynamicLayer concatenating the whole cache each step: the same tokens and logits as with transformers' own layer,
and no tensor handed out earlier is ever written over, through growth, crop, batch selection, beam reordering and
reset."""

import pytest
import torch

from qwen2_moe_hf import compat

import helpers

pytestmark = pytest.mark.skipif(compat.AppendingLayer is None,
                                reason="transformers 4.x: its DynamicCache keeps key / value lists, left as they are")


@pytest.fixture
def small_spare(monkeypatch):
    """Room for only 3 more positions per new buffer: a short generate regrows the buffers many times."""
    monkeypatch.setattr(compat, "KV_SPARE", 3)


def _generate(model, on, **kwargs):
    input_ids, attention_mask, _ = helpers.parity_inputs(model.config.vocab_size)
    compat.APPEND_KV_IN_PLACE = on
    try:
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, return_dict_in_generate=True, output_scores=True, **kwargs)
    finally:
        compat.APPEND_KV_IN_PLACE = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generate_equals_transformers_dynamic_layer(dtype, small_spare):
    model = helpers.build_model("gqa").to(dtype)
    ours = _generate(model, True, max_new_tokens=24)
    theirs = _generate(model, False, max_new_tokens=24)
    assert all(type(layer) is compat.AppendingLayer for layer in ours.past_key_values.layers)
    assert not any(type(layer) is compat.AppendingLayer for layer in theirs.past_key_values.layers)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        assert torch.equal(a, b)
    layer = ours.past_key_values.layers[0]
    assert layer.keys.shape[-2] == ours.sequences.shape[1] - 1  # the last token's states are never computed


def test_beam_search_equals_transformers_dynamic_layer(small_spare):
    model = helpers.build_model("top3_of_8_wide_heads")
    ours = _generate(model, True, max_new_tokens=10, num_beams=3)
    theirs = _generate(model, False, max_new_tokens=10, num_beams=3)
    assert torch.equal(ours.sequences, theirs.sequences)


def _states(gen, positions, heads=2, batch=2, dim=4):
    return torch.randn(batch, heads, positions, dim, generator=gen), torch.randn(batch, heads, positions, dim,
                                                                                 generator=gen)


def test_no_view_handed_out_is_written_over(small_spare):
    gen = torch.Generator().manual_seed(0)
    cache, plain = compat.DynamicCache(), compat.DynamicCache()
    k, v = _states(gen, 5)
    cache.update(k, v, 0)
    plain.update(k, v, 0)
    compat.append_kv_in_place(cache, 0, k)
    assert type(cache.layers[0]) is compat.AppendingLayer
    handed = []

    def step(positions=1):
        k, v = _states(gen, positions)
        got = cache.update(k, v, 0)
        want = plain.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        handed.append((got[0].clone(), got[1].clone(), got))

    for _ in range(6):  # appends within the room, then a regrowth
        step()
    step(4)
    cache.crop(-3)
    plain.crop(-3)
    step()  # after a crop: a new buffer, so the views handed out before keep their positions
    cache.batch_select_indices(torch.tensor([1]))
    plain.batch_select_indices(torch.tensor([1]))
    k, v = _states(gen, 1, batch=1)
    got, want = cache.update(k, v, 0), plain.update(k, v, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for key, value, view in handed:
        assert torch.equal(view[0], key) and torch.equal(view[1], value)
    cache.reset()
    plain.reset()
    k, v = _states(gen, 2)
    got, want = cache.update(k, v, 0), plain.update(k, v, 0)
    assert torch.equal(got[0], want[0]) and got[0].shape[-2] == 2
