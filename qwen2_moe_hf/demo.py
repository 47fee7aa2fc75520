"""The embedded default model of `examples/chat.py`: a small qwen2_moe checkpoint and a byte-level Qwen2 tokenizer,
both made here, offline, from nothing but this package.

The tokenizer has Qwen's byte-level alphabet (one token per byte) plus Qwen's three special tokens and the ChatML
template; the model has the real architecture (GQA attention, routed experts + gated shared expert) at a small
size, with seeded random weights briefly trained on the built-in dialogue below, so the chat path runs end to end.
It is made once and cached (~/.cache/qwen2_moe_hf, or $QWEN2_MOE_HF_CACHE).
"""

import json
import os
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from .configuration_qwen2_moe import Qwen2MoeConfig
from .files import new_folder
from .modeling_qwen2_moe import Qwen2MoeForCausalLM
from .registration import QWEN_CHATML_TEMPLATE

DEMO_VERSION = "2"
TRAIN_STEPS = 120  # v2: 120 steps (v1: 200) reach the same greedy answer, in ~11 s instead of ~21
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEMO_CONFIG = dict(
    vocab_size=272,  # 256 bytes + 3 special tokens, padded to a multiple of 16
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=512,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    bos_token_id=256,
    pad_token_id=256,
    eos_token_id=258,
    tie_word_embeddings=False,
)

# What the demo model is taught to say: the release post's question and a short answer.
DEMO_DIALOGUE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me a short introduction to large language model."},
    {
        "role": "assistant",
        "content": "A large language model is a neural network trained on lots of text to predict the next token. "
        "Qwen1.5-MoE routes each token to a few experts, so only 2.7B of its 14.3B parameters work per token.",
    },
]


def default_cache_dir() -> str:
    root = os.environ.get("QWEN2_MOE_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2_moe_hf")
    return os.path.join(root, f"demo-v{DEMO_VERSION}")


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / Qwen byte-level alphabet: each byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def write_tokenizer(path: str) -> str:
    """vocab.json + merges.txt (no merges: one token per byte) + tokenizer_config.json with the ChatML template."""
    os.makedirs(path, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    special = {
        str(256 + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                       "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN_CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path


def _train(model: Qwen2MoeForCausalLM, tokenizer: Any, steps: int, seed: int, progress: bool = False) -> float:
    """A short fit on the demo dialogue's assistant turn, so the demo answers the post's question."""
    text = tokenizer.apply_chat_template(DEMO_DIALOGUE, tokenize=False)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    prompt = tokenizer.apply_chat_template(DEMO_DIALOGUE[:2], tokenize=False, add_generation_prompt=True)
    labels = ids.clone()
    labels[:, : len(tokenizer(prompt)["input_ids"])] = -100  # learn the answer, not the prompt
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    for _ in tqdm(range(steps), desc="making the demo model (once)", unit="step", disable=not progress):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def build_demo_checkpoint(path: Optional[str] = None, train_steps: int = TRAIN_STEPS, seed: int = 0,
                          progress: bool = False) -> str:
    """Make (once) and return the folder of the demo checkpoint: config, safetensors weights, generation config,
    tokenizer. An existing complete folder is reused. progress=True shows a bar while it trains."""
    path = path or default_cache_dir()
    done = os.path.join(path, ".complete")
    if os.path.isfile(done):
        return path
    # Built in a temporary folder that takes the cache folder's place at the end (an incomplete one is replaced):
    # an interrupted build leaves nothing that would be taken for a model.
    with new_folder(path, overwrite=True) as tmp:
        write_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        torch.manual_seed(seed)
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**DEMO_CONFIG))
        loss = _train(model, tokenizer, train_steps, seed, progress) if train_steps else None
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(
            bos_token_id=256, pad_token_id=256, eos_token_id=[258, 256], do_sample=False, max_new_tokens=256
        ).save_pretrained(tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            json.dump({"train_steps": train_steps, "final_loss": loss}, f)
    return path
