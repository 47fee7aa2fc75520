"""Chat with a qwen2_moe model, streaming tokens and printing tokens/s.

    python examples/chat.py                      # the embedded demo model (made once, offline, then cached)
    python examples/chat.py --model PATH_OR_ID   # a real checkpoint, e.g. Qwen/Qwen1.5-MoE-A2.7B-Chat
    python examples/chat.py --prompt "..."       # one question, no interactive loop

Without --prompt and with a terminal on stdin, it keeps chatting until an empty line or EOF; otherwise it asks the
release post's question once.
"""

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import qwen2_moe_hf
from qwen2_moe_hf.demo import build_demo_checkpoint

BLOG_QUESTION = "Give me a short introduction to large language model."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the embedded demo model)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    parser.add_argument("--prompt", help="ask this once instead of chatting")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--moe-backend", default=None, help="expert-dispatch backend (default: auto)")
    args = parser.parse_args(argv)

    if args.model is None:
        print("No --model given: using the embedded demo model (a tiny qwen2_moe made offline; its answers are "
              "memorised, not intelligent).", file=sys.stderr)
        args.model = build_demo_checkpoint()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    load_kwargs = dict(device_map="auto", **qwen2_moe_hf.compat.dtype_kwarg(dtype))
    if args.moe_backend:
        load_kwargs["moe_backend"] = args.moe_backend
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    print(f"model: {args.model} ({type(model).__name__}, {model.dtype}, {model.device})", file=sys.stderr)
    # Build the compiled MoE ops now (once per machine, ~30 s), so tokens/s measures generation only.
    backends = qwen2_moe_hf.env_report()
    print("moe backends: " + ", ".join(f"{n}: {s}" for n, s in backends.items()), file=sys.stderr)

    messages = [{"role": "system", "content": args.system}]
    interactive = args.prompt is None and sys.stdin.isatty()
    question = args.prompt or BLOG_QUESTION
    while True:
        if interactive:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
        else:
            print(f"you> {question}")
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer([text], return_tensors="pt").to(model.device)
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer)
        elapsed = time.perf_counter() - start
        new_tokens = output[0, inputs.input_ids.shape[1]:]
        print(f"[{len(new_tokens)} tokens in {elapsed:.2f} s: {len(new_tokens) / elapsed:.1f} tokens/s]")
        messages.append({"role": "assistant", "content": tokenizer.decode(new_tokens, skip_special_tokens=True)})
        if not interactive:
            break


if __name__ == "__main__":
    main()
