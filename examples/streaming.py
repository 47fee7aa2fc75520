"""Stream an answer as it is generated, with transformers' TextIteratorStreamer: `generate` runs in a thread and the
main thread reads the text piece by piece (transformers' documented pattern; a web handler would send each piece
on instead of printing it).

    python examples/streaming.py                                   # the embedded demo model (made once, offline)
    python examples/streaming.py Qwen/Qwen1.5-MoE-A2.7B-Chat --prompt "What is a mixture of experts?"
    python examples/streaming.py Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 --max-new-tokens 256

The answer goes to stdout as it comes; the number of pieces goes to stderr at the end.
"""

import argparse
import sys
from threading import Thread

import qwen2_moe_hf  # noqa: F401  registers qwen2_moe with the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from qwen2_moe_hf.demo import build_demo_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint folder or hub id (default: the embedded demo model)")
    parser.add_argument("--prompt", default="Give me a short introduction to large language model.")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()

    path = args.model or build_demo_checkpoint(progress=True)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt").to(model.device)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens))
    thread.start()
    pieces = 0
    for piece in streamer:  # blocks until generate has decoded the next printable piece; ends when generate does
        print(piece, end="", flush=True)
        pieces += piece != ""
    thread.join()
    print()
    print(f"[streamed in {pieces} pieces]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
