"""Before / after: the same measurements on two checkouts of this repository, in alternating child processes.

    python benchmarks/compare_trees.py OLD_DIR NEW_DIR [--modes bf16 int4 decode decode_int4] [--pairs 3]

Each child imports qwen2_moe_hf from one tree (PYTHONPATH) with its own extension folder, and measures through the
public API only, so any two commits compare:
  bf16 / int4      one MoE layer at the real Qwen1.5-MoE-A2.7B shape (hidden 2048, 60 experts of 1408, top-4,
                   shared expert 5632; int4: GPTQ group 128, sym, shared expert too), random weights, at 1 / 16 /
                   256 tokens, a 64 MiB read before every call; median ms;
  decode / _int4   a 4-layer model of that shape (vocabulary 32,000), greedy generate from a 16-token prompt: the
                   median of (time for 25 new tokens - time for 1) / 24, in ms per token;
  decode_gptq      the same with q/k/v/o in GPTQ-Int4 too, as the released GPTQ-Int4 checkpoint has them.
Pairs alternate which tree runs first; the table gives the medians over pairs and new / old.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPE = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             num_hidden_layers=1, vocab_size=1024)
PROJ = ("gate_proj", "up_proj", "down_proj")
MODES = ("bf16", "int4", "decode", "decode_int4", "decode_gptq")


def _quantized(module, attention=False):
    """`module` with every expert and shared-expert projection (and with `attention` q/k/v/o) in GPTQ-Int4 (from
    fp32), then bf16."""
    import torch
    from qwen2_moe_hf.gptq.format import GPTQSpec
    from qwen2_moe_hf.gptq.quantize import quantize_linears_

    module = module.float()
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
             and (n.rsplit(".", 1)[-1] in PROJ and ("experts." in n or "shared_expert." in n)
                  or attention and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    quantize_linears_(module, names, GPTQSpec(bits=4, group_size=128, sym=True))
    return module.to(torch.bfloat16)


def child(mode, rounds):
    import torch

    torch.set_num_threads(2)
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    int4 = mode.endswith("int4") or mode == "decode_gptq"
    if mode.startswith("decode"):
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**SHAPE, "num_hidden_layers": 4, "vocab_size": 32000}))
    else:
        model = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(**SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = (_quantized(model, attention=mode == "decode_gptq") if int4 else model.to(torch.bfloat16)).eval()
    result = {}
    with torch.no_grad():
        if mode.startswith("decode"):
            ids = torch.randint(0, 32000, (1, 16))

            def generate(n):
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return time.perf_counter() - start

            generate(4)
            result["ms/token"] = statistics.median((generate(25) - generate(1)) / 24 * 1e3 for _ in range(rounds))
        else:
            clean = torch.ones(16 << 20)
            for tokens in (1, 16, 256):
                xs = [torch.randn(1, tokens, 2048, dtype=torch.bfloat16) for _ in range(4)]
                model(xs[0])
                times = []
                for i in range(rounds * (16 if tokens == 1 else 2 if tokens == 16 else 1)):
                    clean.sum()
                    start = time.perf_counter()
                    model(xs[i % len(xs)])
                    times.append(time.perf_counter() - start)
                result[f"{tokens} tok ms"] = statistics.median(times) * 1e3
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ext-root", default="/tmp/qwen2_moe_hf_compare",
                        help="each tree's extension build goes in a folder below this one")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    results = {m: {"old": [], "new": []} for m in args.modes}
    for pair in range(args.pairs):
        for mode in args.modes:
            for side in ("old", "new") if pair % 2 == 0 else ("new", "old"):
                env = dict(os.environ, PYTHONPATH=trees[side], OMP_NUM_THREADS="2",
                           TORCH_EXTENSIONS_DIR=os.path.join(args.ext_root, side))
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "x", "x", "--child", mode,
                                       str(args.rounds)], env=env, capture_output=True, text=True, cwd="/")
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if not lines:
                    sys.exit(f"{side} {mode} failed:\n{proc.stderr[-3000:]}")
                results[mode][side].append(json.loads(lines[0][7:]))
                print(f"pair {pair} {mode} {side}: {results[mode][side][-1]}", file=sys.stderr, flush=True)
    print("| mode | measure | old | new | new / old |\n|---|---|---|---|---|")
    for mode in args.modes:
        for key in results[mode]["old"][0]:
            old = statistics.median(r[key] for r in results[mode]["old"])
            new = statistics.median(r[key] for r in results[mode]["new"])
            print(f"| {mode} | {key} | {old:.2f} | {new:.2f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
