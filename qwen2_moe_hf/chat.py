"""`qwen2-moe-hf chat`: a terminal chat with a qwen2_moe model, streamed, with ChatML history.

    qwen2-moe-hf chat                                   # the embedded demo model (made once, offline, then cached)
    qwen2-moe-hf chat --model Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 --temperature 0.7 --top-p 0.8
    qwen2-moe-hf chat --prompt "..."                    # one question, then exit

In the chat, `/reset` forgets the conversation (the system prompt stays) and `/exit` (or end of input) quits.
Without --prompt and without a terminal on stdin, it asks the release post's question once. After each answer it
prints the number of new tokens and tokens/s (the generate call, prompt included).
"""

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from . import compat
from .demo import build_demo_checkpoint
from .moe import env_report

BLOG_QUESTION = "Give me a short introduction to large language model."
DEFAULT_SYSTEM = "You are a helpful assistant."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the embedded demo model)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    parser.add_argument("--prompt", help="ask this once instead of chatting")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; > 0: sample at this temperature")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --temperature > 0)")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible answers")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device-map", default="auto", help="accelerate device map (default: auto)")
    parser.add_argument("--moe-backend", default=None, help="expert-dispatch backend (default: auto)")


def generation_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """generate()'s sampling arguments from the command line; a bad combination is an error naming the flag."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: expected >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k: expected >= 1, got {args.top_k}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise ValueError(f"--repetition-penalty: expected > 0, got {args.repetition_penalty}")
    kwargs: Dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.temperature == 0:
        if args.top_p is not None or args.top_k is not None:
            raise ValueError("--top-p / --top-k sample: give --temperature > 0 with them")
        return dict(kwargs, do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs.update(do_sample=True, temperature=args.temperature)
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.top_k is not None:
        kwargs["top_k"] = args.top_k
    return kwargs


class Chat:
    """The conversation: ChatML history through the tokenizer's chat template, one streamed generate per turn."""

    def __init__(self, model: Any, tokenizer: Any, system: str, generate_kwargs: Dict[str, Any],
                 seed: Optional[int] = None, out: TextIO = sys.stdout) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.generate_kwargs, self.seed, self.out = generate_kwargs, seed, out
        self.reset()

    def reset(self) -> None:
        self.messages: List[Dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, question: str) -> str:
        """Stream the answer to `question` (printed as it comes), add both turns to the history, return the answer."""
        self.messages.append({"role": "user", "content": question})
        text = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer([text], return_tensors="pt").to(self.model.device)
        print("assistant> ", end="", flush=True, file=self.out)
        streamer = _Streamer(self.tokenizer, self.out, skip_prompt=True, skip_special_tokens=True)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        start = time.perf_counter()
        output = self.model.generate(**inputs, streamer=streamer, **self.generate_kwargs)
        elapsed = time.perf_counter() - start
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        answer = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        print(f"[{len(new_tokens)} tokens in {elapsed:.2f} s: {len(new_tokens) / elapsed:.1f} tokens/s]",
              file=self.out, flush=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def loop(self, read: Callable[[str], str] = input) -> None:
        """Turns from `read` until /exit or end of input; /reset starts over; empty lines are skipped."""
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                print(file=self.out)
                return
            if line == "/exit":
                return
            if line == "/reset":
                self.reset()
                print("(conversation reset)", file=self.out, flush=True)
            elif line:
                self.ask(line)


class _Streamer(TextStreamer):
    """transformers' TextStreamer, writing to the chat's output instead of sys.stdout."""

    def __init__(self, tokenizer: Any, out: TextIO, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None, file=self.out)


def run(args: argparse.Namespace) -> int:
    try:
        generate_kwargs = generation_kwargs(args)
    except ValueError as exc:
        print(f"qwen2-moe-hf chat: error: {exc}", file=sys.stderr)
        return 2
    model_path = args.model
    if model_path is None:
        print("No --model given: using the embedded demo model (a tiny qwen2_moe made offline; its answers are "
              "memorised, not intelligent).", file=sys.stderr)
        model_path = build_demo_checkpoint(progress=True)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    load_kwargs: Dict[str, Any] = dict(device_map=args.device_map, **compat.dtype_kwarg(dtype))
    if args.moe_backend:
        load_kwargs["moe_backend"] = args.moe_backend
    model = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_path)
    print(f"model: {model_path} ({type(model).__name__}, {model.dtype}, {model.device})", file=sys.stderr)
    # Builds the compiled MoE ops now (once per machine), so the first answer's tokens/s measures generation only.
    print("moe backends: " + ", ".join(f"{n}: {s}" for n, s in env_report().items()), file=sys.stderr)

    chat = Chat(model, tokenizer, args.system, generate_kwargs, seed=args.seed)
    if args.prompt is not None or not sys.stdin.isatty():
        question = args.prompt if args.prompt is not None else BLOG_QUESTION
        print(f"you> {question}", flush=True)
        chat.ask(question)
    else:
        print("(/reset forgets the conversation, /exit quits)", file=sys.stderr)
        chat.loop()
    return 0
