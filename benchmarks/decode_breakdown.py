"""Where a decode step's time goes: batch-1 greedy `generate` on a real-shape Qwen1.5-MoE model (random weights, the
real 151,936-token vocabulary, --layers layers), bf16 and GPTQ-Int4, split into

    MoE block (router, routed + shared experts) | attention projections (q/k/v/o) | attention core (RoPE, KV cache,
    scaled dot product) | RMSNorms | lm_head | embedding | the rest (generate's loop, sampling, the decoder layers'
    residual adds, Python between modules)

each against its floor: the bytes it must read once per token / the read bandwidth measured in the same run. Times
come from forward hooks (perf_counter before and after each module; the hooks' own cost, a few microseconds per
module, lands in "the rest") over whole `generate` calls, medians over interleaved repeats. Hooks keep every layer
on its modules (the one-call decode lane, moe/decode_layer.py, stands aside for them), so the split is the modules'
path; the last row times the same generate without hooks, each layer's step in one call, as users run it.

    python benchmarks/decode_breakdown.py [--layers 4] [--prompt 128] [--new-tokens 32] [--repeats 3] [--quick]
"""

import argparse
import collections
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

from qwen2_moe_hf import bench

PARTS = ("moe", "attn_proj", "attn_core", "norms", "lm_head", "embedding", "rest")
LABELS = {"moe": "MoE block", "attn_proj": "attention q/k/v/o", "attn_core": "attention core (RoPE, cache, SDPA)",
          "norms": "RMSNorms", "lm_head": "lm_head", "embedding": "embedding", "rest": "the rest (generate, Python)"}


class Clock:
    """Forward-hook timers by part; `attn` is the whole self-attention, from which the projections are subtracted."""

    def __init__(self, model: nn.Module) -> None:
        self.totals: Dict[str, float] = collections.defaultdict(float)
        self.handles = []
        base = model.model
        self.watched = [(base.embed_tokens, "embedding"), (model.lm_head, "lm_head"), (base.norm, "norms")]
        for layer in base.layers:
            self.watched += [(layer.mlp, "moe"), (layer.self_attn, "attn")]
            self.watched += [(getattr(layer.self_attn, name), "attn_proj")
                             for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            self.watched += [(layer.input_layernorm, "norms"), (layer.post_attention_layernorm, "norms")]
        self.attach()

    def _watch(self, module: nn.Module, part: str) -> None:
        starts: List[float] = []

        def pre(*_):
            starts.append(time.perf_counter())

        def post(*_):
            self.totals[part] += time.perf_counter() - starts.pop()

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        self.totals.clear()

    def attach(self) -> None:
        if not self.handles:
            for module, part in self.watched:
                self._watch(module, part)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def floors(model: nn.Module, int4: bool, ctx: int) -> Dict[str, int]:
    """Bytes per decode step by part: weights read once (top-k experts of each layer), the KV cache at `ctx`."""
    config = model.config
    parts = collections.Counter()
    x = torch.zeros(1, 1, config.hidden_size, dtype=torch.bfloat16)
    for layer in model.model.layers:
        if int4:
            parts["moe"] += bench.int4_bytes(config, config.num_experts_per_tok, bench.INT4.group_size)
        else:
            weights, _, _ = bench.floor_work(layer.mlp, x)
            parts["moe"] += weights  # x = 0 routes to 4 experts: top-k of them, the shared expert, the router
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            parts["attn_proj"] += sum(t.numel() * t.element_size()
                                      for t in getattr(layer.self_attn, name).state_dict().values())
        head_dim = config.hidden_size // config.num_attention_heads
        parts["attn_core"] += 2 * ctx * config.num_key_value_heads * head_dim * 2
        parts["norms"] += 2 * config.hidden_size * 2
    parts["norms"] += config.hidden_size * 2
    parts["lm_head"] = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    parts["embedding"] = config.hidden_size * 2
    return dict(parts)


def run(model: nn.Module, clock: Clock, ids: torch.Tensor, new_tokens: int) -> Dict[str, float]:
    """Seconds per decoded token by part, for one generate (the prefill step left out); "plain": the same generate
    without the hooks."""
    clock.remove()
    plain = bench.decode_step_time(model, ids, new_tokens)
    clock.attach()
    marks: List[float] = []
    snapshots: List[Dict[str, float]] = []

    class Mark(bench.LogitsProcessor):
        def __call__(self, input_ids, scores):
            marks.append(time.perf_counter())
            snapshots.append(dict(clock.totals))
            return scores

    clock.reset()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None, logits_processor=bench.LogitsProcessorList([Mark()]))
    steps = len(marks) - 1
    first, last = snapshots[0], snapshots[-1]
    spent = {p: (last.get(p, 0.0) - first.get(p, 0.0)) / steps for p in ("moe", "attn", "attn_proj", "norms",
                                                                      "lm_head", "embedding")}
    total = (marks[-1] - marks[0]) / steps
    out = {"total": total, "moe": spent["moe"], "attn_proj": spent["attn_proj"],
           "attn_core": spent["attn"] - spent["attn_proj"], "norms": spent["norms"], "lm_head": spent["lm_head"],
           "embedding": spent["embedding"]}
    out["rest"] = total - sum(out[p] for p in PARTS if p != "rest")
    out["plain"] = plain
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = bench.QUICK_SHAPE if args.quick else bench.SHAPE
    vocab = 512 if args.quick else args.vocab
    torch.manual_seed(0)
    bf16 = bench.new_model(shape, args.layers, vocab)
    int4 = bench.int4_copy(bf16, attention=True).eval()
    models = {"bf16": bf16, "int4": int4}
    clocks = {name: Clock(m) for name, m in models.items()}
    ids = torch.randint(0, vocab, (1, args.prompt))
    probe = bench.ReadProbe(64 << 20 if args.quick else 1 << 30)
    samples = {name: collections.defaultdict(list) for name in models}
    bandwidth = []
    with torch.no_grad():
        for name, m in models.items():  # warm-up: builds the CPU ops and prepared weights
            run(m, clocks[name], ids, 3)
        for _ in range(args.repeats):
            for name, m in models.items():
                for part, seconds in run(m, clocks[name], ids, args.new_tokens).items():
                    samples[name][part].append(seconds)
            bandwidth.append(probe())
    read_bw = statistics.median(bandwidth)
    ctx = args.prompt + args.new_tokens // 2
    info = bench.machine_info()
    print(bench.header(info))
    print(f"\nDecode step by part: {args.layers} layers, vocab {vocab}, prompt {args.prompt}, {args.new_tokens} new "
          f"tokens, medians of {args.repeats} interleaved generate calls; read bandwidth {read_bw / 1e9:.1f} GB/s\n")
    print("| part | bf16 ms | bf16 floor ms | bf16 x floor | int4 ms | int4 floor ms | int4 x floor |")
    print("|---|---|---|---|---|---|---|")
    floor = {name: floors(m, name == "int4", ctx) for name, m in models.items()}
    for part in (*PARTS, "total", "plain"):
        cells = []
        for name in models:
            t = statistics.median(samples[name][part])
            if part in ("total", "plain"):
                f = sum(floor[name].values()) / read_bw
            else:
                f = floor[name].get(part, 0) / read_bw
            ratio = f"{t / f:.2f}x" if f > 0 else "-"
            cells += [f"{t * 1e3:.2f}", f"{f * 1e3:.2f}" if f > 0 else "-", ratio]
        label = {"total": "whole step (hooks: the modules)",
                 "plain": "whole step without hooks (layers in one call)"}.get(part) or LABELS[part]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name in models:
        t = statistics.median(samples[name]["plain"])
        print(f"\n{name}: {1 / t:.2f} tokens/s decode ({t * 1e3:.1f} ms/token, no hooks)", end="")
    print()
    for c in clocks.values():
        c.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
