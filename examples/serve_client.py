"""Talk to `qwen2-moe-hf serve` (transformers 5.x) with the official openai client: one answer whole, then one
streamed.

    qwen2-moe-hf serve --model MODEL --port 8000                   # in another terminal
    python examples/serve_client.py MODEL [--base-url http://localhost:8000/v1] [--prompt "..."]

MODEL is the name the server was started with (a hub id or a folder): a server started with --model serves only
that one and answers 400 to a request naming another. Without MODEL, the embedded demo model's folder, i.e. the
server was started with
    qwen2-moe-hf serve --model "$(python -c 'from qwen2_moe_hf.demo import build_demo_checkpoint as b; print(b())')"
Needs `pip install openai`.
"""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="the model the server serves (default: the demo model's folder)")
    parser.add_argument("--base-url", default="http://localhost:8000/v1", help="default: %(default)s")
    parser.add_argument("--prompt", default="Give me a short introduction to large language model.")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    args = parser.parse_args()

    import openai

    from qwen2_moe_hf.demo import default_cache_dir

    model = args.model or default_cache_dir()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")  # the server checks no key
    messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=args.temperature)
    print("--- whole:")
    print(reply.choices[0].message.content)
    print(f"[{reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} completion tokens]")

    print("--- streamed:")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=args.temperature, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
