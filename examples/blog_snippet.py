"""The release post's snippet, as quoted in the project brief, plus `import qwen2_moe_hf`. The model (and optionally
the tokenizer) path is an argument instead of the hub id:

    python examples/blog_snippet.py MODEL [TOKENIZER]
    python examples/blog_snippet.py Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 Qwen/Qwen1.5-MoE-A2.7B-Chat
"""
import sys

import qwen2_moe_hf  # noqa: F401  registers qwen2_moe with AutoConfig / AutoModel* / AutoTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

model_path = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4"
tokenizer_path = sys.argv[2] if len(sys.argv) > 2 else model_path

messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me a short introduction to large language model."},
]

# --- the post's code ---
model = AutoModelForCausalLM.from_pretrained(model_path, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
generated = model.generate(**tokenizer([text], return_tensors="pt").to(model.device), max_new_tokens=512)
# --- end ---

prompt_len = len(tokenizer([text]).input_ids[0])
print(tokenizer.decode(generated[0][prompt_len:], skip_special_tokens=True))
