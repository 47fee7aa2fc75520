"""AutoTokenizer for qwen2_moe checkpoints: Qwen's real tokenizer files give the ids transformers 4.38.2 and 5.23.0
give (../shared/NOTES.md); a checkpoint whose tokenizer_config has no chat_template gets the Qwen ChatML one."""

import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from qwen2_moe_hf import QWEN_CHATML_TEMPLATE

import helpers

needs_tokenizer = pytest.mark.skipif(
    not os.path.isfile(os.path.join(helpers.TOKENIZER_DIR, "vocab.json")),
    reason=f"Qwen tokenizer files not found at {helpers.TOKENIZER_DIR} (../shared/qwen-tokenizer)",
)


def _copy_tokenizer(dest, drop=(), model_type="qwen2_moe"):
    os.makedirs(dest, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(helpers.TOKENIZER_DIR, name), dest)
    with open(os.path.join(helpers.TOKENIZER_DIR, "tokenizer_config.json")) as f:
        config = json.load(f)
    for key in drop:
        config.pop(key)
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if model_type:
        with open(os.path.join(dest, "config.json"), "w") as f:
            json.dump(dict(helpers.tiny_config_kwargs(), model_type=model_type), f)
    return dest


def _blog_ids(tokenizer):
    # The release post's way: template to text, then tokenize the text.
    text = tokenizer.apply_chat_template(helpers.BLOG_MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer([text], return_tensors="pt").input_ids[0].tolist()


@needs_tokenizer
def test_real_tokenizer_gives_the_blog_prompt_ids():
    tokenizer = AutoTokenizer.from_pretrained(helpers.TOKENIZER_DIR)
    assert _blog_ids(tokenizer) == helpers.BLOG_PROMPT_IDS
    assert tokenizer("hello").input_ids == [14990]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]


@needs_tokenizer
def test_missing_chat_template_defaults_to_chatml(tmp_path):
    path = _copy_tokenizer(str(tmp_path / "ckpt"), drop=("chat_template",))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == QWEN_CHATML_TEMPLATE
    assert _blog_ids(tokenizer) == helpers.BLOG_PROMPT_IDS


@needs_tokenizer
def test_chatml_default_is_only_for_qwen2_moe_checkpoints(tmp_path):
    path = _copy_tokenizer(str(tmp_path / "other"), drop=("chat_template",), model_type="llama")
    assert AutoTokenizer.from_pretrained(path).chat_template is None


@needs_tokenizer
def test_no_tokenizer_class_resolves_through_our_config(tmp_path):
    path = _copy_tokenizer(str(tmp_path / "ckpt"), drop=("tokenizer_class",))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert _blog_ids(tokenizer) == helpers.BLOG_PROMPT_IDS
