"""generate(): greedy and sampling, batched with left padding, TextStreamer, and the checkpoint's
generation_config.json (Qwen's eos list)."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, TextStreamer

from qwen2_moe_hf import compat
from qwen2_moe_hf.demo import build_demo_checkpoint

import helpers

BASE_GENERATION_CONFIG = os.path.join(helpers.METADATA_DIR, "Qwen1.5-MoE-A2.7B.generation_config.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """An untrained demo checkpoint (fast to make): real tokenizer machinery, tiny model."""
    path = build_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "ckpt"), train_steps=0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_batched_left_padded_greedy_equals_each_prompt_alone():
    model = helpers.build_model("gqa")
    prompts = [[5, 9, 22], [7, 3, 11, 40, 2, 99]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        assert batched[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = helpers.build_model("gqa")
    ids = torch.tensor([[5, 9, 22, 31]])
    kwargs = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, do_sample=True, temperature=1.5, top_p=0.95, **kwargs))
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(ids, do_sample=False, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, **kwargs), greedy)
    samples = set()
    for seed in range(6):
        torch.manual_seed(seed)
        samples.add(tuple(model.generate(ids, do_sample=True, temperature=2.0, **kwargs)[0].tolist()))
    assert len(samples) > 1, "sampling never varied"


def _same_arguments(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert (ours[key].dtype, ours[key].shape, ours[key].device) == (value.dtype, value.shape, value.device), key
            assert torch.equal(ours[key], value) and ours[key].is_contiguous() == value.is_contiguous(), key
        else:
            assert ours[key] is value or ours[key] == value, key


GENERATE_CASES = {
    "greedy": dict(do_sample=False),
    "left-padded": dict(do_sample=False, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),
    "sampling": dict(do_sample=True, temperature=1.3, top_p=0.9),
    "scores and logits": dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True),
    "static cache": dict(do_sample=False, cache_implementation="static"),
}


@pytest.mark.skipif(not compat.IS_V5, reason="transformers 4.x: generate takes compat.prepare_inputs_for_generation "
                                             "and its own kwargs update, tested by the rest of this file")
@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_a_decode_steps_arguments_are_what_generationmixin_makes(case, monkeypatch):
    """The model's prepare_inputs_for_generation and _update_model_kwargs_for_generation build a decode step's
    common case themselves (compat.decode_step_inputs / next_step_kwargs): at every call of a real generate, what
    they return is what GenerationMixin's own returns on the same arguments (same keys, same objects, equal tensors of
    the same layout); where they decline (the prompt, a compileable cache), GenerationMixin's runs."""
    from transformers.generation.utils import GenerationMixin

    model = helpers.build_model("gqa")
    taken = {"inputs": 0, "kwargs": 0}
    fast_inputs, fast_kwargs = compat.decode_step_inputs, compat.next_step_kwargs

    def decode_step_inputs(model_, input_ids, kwargs):
        theirs = GenerationMixin.prepare_inputs_for_generation(model_, input_ids, **kwargs)
        ours = fast_inputs(model_, input_ids, kwargs)
        if ours is not None:
            taken["inputs"] += 1
            _same_arguments(ours, theirs)
        return ours

    def next_step_kwargs(outputs, model_kwargs, *args, **kwargs):
        theirs = GenerationMixin._update_model_kwargs_for_generation(model, outputs, dict(model_kwargs), *args,
                                                                      **kwargs)
        ours = fast_kwargs(outputs, model_kwargs, *args, **kwargs)
        if ours is not None:
            taken["kwargs"] += 1
            assert ours is model_kwargs  # updated in place, as GenerationMixin's is
            _same_arguments(ours, theirs)
        return ours

    monkeypatch.setattr(compat, "decode_step_inputs", decode_step_inputs)
    monkeypatch.setattr(compat, "next_step_kwargs", next_step_kwargs)
    kwargs = dict(GENERATE_CASES[case])
    ids = torch.tensor([[5, 9, 22, 31, 7], [3, 8, 1, 40, 2]])
    torch.manual_seed(0)
    ours = model.generate(ids, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, eos_token_id=None, **kwargs)
    steps = 5  # 6 new tokens: the prompt's forward, then 5 decode steps
    assert taken == ({"inputs": 0, "kwargs": steps + 1} if case == "static cache"
                     else {"inputs": steps, "kwargs": steps + 1})
    monkeypatch.setattr(compat, "decode_step_inputs", lambda *args: None)
    monkeypatch.setattr(compat, "next_step_kwargs", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    theirs = model.generate(ids, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, eos_token_id=None, **kwargs)
    if case == "scores and logits":
        ours, theirs = ours.sequences, theirs.sequences
    assert torch.equal(ours, theirs)


def test_text_streamer_prints_the_generated_text(demo, capsys):
    model, tokenizer = demo
    text = tokenizer.apply_chat_template(helpers.BLOG_MESSAGES, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    expected = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert printed.strip() == expected.strip()


class _ForceToken(LogitsProcessor):
    """Force `token` at generation step `step` (0-based), leave other steps alone."""

    def __init__(self, prompt_len, step, token):
        self.prompt_len, self.step, self.token = prompt_len, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


@pytest.mark.skipif(not os.path.isfile(BASE_GENERATION_CONFIG), reason="../shared/qwen1.5-moe-metadata not found")
def test_generation_config_json_is_honoured(tmp_path):
    """With the real checkpoint's generation_config.json, both eos ids (151645 <|im_end|>, 151643 <|endoftext|>)
    end generation."""
    model = helpers.build_model("gqa", vocab_size=151646)
    model.save_pretrained(tmp_path)
    shutil.copy(BASE_GENERATION_CONFIG, tmp_path / "generation_config.json")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = json.load(open(BASE_GENERATION_CONFIG))
    assert loaded.generation_config.eos_token_id == expected["eos_token_id"] == [151645, 151643]
    assert loaded.generation_config.pad_token_id == 151643
    ids = torch.tensor([[5, 9, 22]])
    for eos in (151645, 151643):
        forced = LogitsProcessorList([_ForceToken(3, 4, eos)])
        out = loaded.generate(ids, max_new_tokens=20, do_sample=False, logits_processor=forced)
        assert out.shape[1] == 3 + 5 and out[0, -1].item() == eos
