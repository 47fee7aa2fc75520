"""One MoE layer at the real Qwen1.5-MoE-A2.7B shape (hidden 2048, 60 experts of 1408, top-4, shared 5632), on CPU:
our block (each available backend) vs transformers 5.23's built-in block (eager / grouped_mm / batched_mm, same
weights), against the floor = max(weights read once / measured copy bandwidth, FLOPs / measured large-matmul rate),
the two rates measured in every round beside the variants (medians).

    python benchmarks/moe_block.py [--dtype bfloat16 float32] [--tokens 1 16 256 1024] [--threads 2] [--repeats 7]

All variants run interleaved (round-robin) in one process; medians are reported. Needs transformers >= 5 for the
built-in rows (they are left out otherwise).
"""

import argparse
import statistics
import time

import torch

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.moe import route

SHAPE = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             num_hidden_layers=1, vocab_size=1024)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CopyProbe:
    """STREAM-style copy of 512 MiB: bytes read + bytes written per second (the larger, stricter convention)."""

    def __init__(self, nbytes=512 << 20):
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def __call__(self):
        return 2 * self.src.numel() / timed(lambda: self.dst.copy_(self.src))


class CleanCaches:
    """Reads 64 MiB (twice the last-level cache) so that every timed call starts alike: caches full of clean data
    it does not use. Without it the first variant after the probes paid for writing back the matmul probe's dirty
    output (~10 MB, ~0.7 ms at 1 token), a cost that belongs to neither the variant nor a decode step."""

    def __init__(self, nbytes=64 << 20):
        self.buf = torch.ones(nbytes // 4)

    def __call__(self):
        self.buf.sum()


class MatmulProbe:
    """A large matmul (1024 x 2048 x 2816): FLOP per second."""

    def __init__(self, dtype, m=1024, k=2048, n=2816):
        self.a, self.b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        self.flops = 2 * m * k * n
        self.a @ self.b

    def __call__(self):
        return self.flops / timed(lambda: self.a @ self.b)


def builtin_block(ours, dtype):
    """transformers' own Qwen2MoeSparseMoeBlock with our block's weights (experts fused as it stores them)."""
    from transformers.models.qwen2_moe import configuration_qwen2_moe as hf_config
    from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_model

    config = hf_config.Qwen2MoeConfig(**SHAPE)
    block = hf_model.Qwen2MoeSparseMoeBlock(config).to(dtype)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(ours.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            block.experts.down_proj[e].copy_(expert.down_proj.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_expert, name).weight.copy_(getattr(ours.shared_expert, name).weight)
        block.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
    return block, config


def available_memory():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def floor_work(block, x):
    """(weight bytes read once, FLOPs, experts hit) of one forward of `block` on x."""
    config = block.config
    tokens = x.shape[0] * x.shape[1]
    _, ids = route(block.gate(x.reshape(-1, config.hidden_size)), config.num_experts_per_tok, config.norm_topk_prob)
    hit = ids.unique().numel()
    bytes_per = x.element_size()
    expert_bytes = 3 * config.hidden_size * config.moe_intermediate_size * bytes_per
    shared_bytes = 3 * config.hidden_size * config.shared_expert_intermediate_size * bytes_per
    router_bytes = (config.num_experts + 1) * config.hidden_size * bytes_per
    weights = hit * expert_bytes + shared_bytes + router_bytes
    flops = 2 * tokens * config.hidden_size * (
        3 * config.num_experts_per_tok * config.moe_intermediate_size
        + 3 * config.shared_expert_intermediate_size + config.num_experts + 1
    )
    return weights, flops, hit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-slow", action="store_true",
                        help="leave out (as '-') variants whose first run is slower than 20x the floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # The floor's copy bandwidth and matmul rate are measured in every round of the round-robin, beside the
    # variants, and their medians used: this machine's speed drifts by up to 2x within minutes, so rates taken
    # once at the start would compare the variants against a different machine.
    copy_probe = CopyProbe()
    clean_caches = CleanCaches()
    start_bw = max(copy_probe() for _ in range(3))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; copy bandwidth at start {start_bw / 1e9:.1f} GB/s (read+write)")
    print(f"backends: {qwen2_moe_hf.env_report()}")
    try:
        import transformers

        have_builtin = int(transformers.__version__.split(".")[0]) >= 5
    except Exception:
        have_builtin = False

    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        # The best large-matmul rate this machine reaches, whatever the dtype (on AVX2 without native bf16: fp32).
        probes = {name: MatmulProbe(getattr(torch, name)) for name in ("bfloat16", "float32")}
        rates = {name: max(probe() for _ in range(2)) for name, probe in probes.items()}
        matmul_name = max(rates, key=rates.get)
        matmul_probe = probes[matmul_name]
        print(f"\n## {dtype_name}: large matmul 1024x2048x2816 at start: bf16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s, "
              f"fp32 {rates['float32'] / 1e9:.0f} GFLOP/s (the floor uses {matmul_name}, re-measured each round)")
        config = Qwen2MoeConfig(**SHAPE)
        ours = Qwen2MoeSparseMoeBlock(config)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.02)
        ours = ours.to(dtype).eval()
        variants = {}
        for name, state in qwen2_moe_hf.env_report().items():
            if state == "available":
                variants[f"ours[{name}]"] = (ours, name)
        if have_builtin:
            builtin, hf_config = builtin_block(ours, dtype)
            for impl in ("eager", "grouped_mm", "batched_mm"):
                variants[f"builtin[{impl}]"] = (builtin, impl)

        header = (f"| tokens | copy GB/s | matmul GFLOP/s | floor ms | experts hit | " + " | ".join(variants)
                  + " | ours best / floor | builtin best / ours best |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for tokens in args.tokens:
            x = torch.randn(1, tokens, config.hidden_size, dtype=dtype)
            weights, flops, hit = floor_work(ours, x)
            floor = max(weights / start_bw, flops / rates[matmul_name])  # until the rounds have measured it
            times = {name: [] for name in variants}
            copy_bws, matmul_rates = [], []
            with torch.no_grad():
                for name, (block, impl) in variants.items():  # warm-up, and drop hopeless variants
                    if block is ours:
                        config.moe_backend = impl
                    else:
                        hf_config._experts_implementation = impl
                    if impl == "batched_mm":  # gathers every selected expert's weights per token
                        need = tokens * config.num_experts_per_tok * 3 * config.hidden_size * \
                            config.moe_intermediate_size * x.element_size()
                        if need > available_memory() // 2:
                            print(f"{name} at {tokens} tokens left out: it would gather {need / 2**30:.0f} GiB")
                            times[name] = None
                            continue
                    try:
                        first = timed(lambda: block(x))
                    except RuntimeError as exc:  # e.g. batched_mm gathers a weight copy per token: OOM at 1024
                        print(f"{name} at {tokens} tokens failed: {str(exc).splitlines()[0][:120]}")
                        times[name] = None
                        continue
                    if args.skip_slow and first > 20 * floor:
                        times[name] = None
                for _ in range(args.repeats):
                    copy_bws.append(copy_probe())
                    matmul_rates.append(matmul_probe())
                    for name, (block, impl) in variants.items():
                        if times[name] is None:
                            continue
                        if block is ours:
                            config.moe_backend = impl
                        else:
                            hf_config._experts_implementation = impl
                        clean_caches()
                        times[name].append(timed(lambda: block(x)))
            copy_bw, matmul_rate = statistics.median(copy_bws), statistics.median(matmul_rates)
            floor = max(weights / copy_bw, flops / matmul_rate)
            med = {n: statistics.median(t) if t else float("nan") for n, t in times.items()}
            ours_best = min(v for n, v in med.items() if n.startswith("ours") and v == v)
            builtin_vals = [v for n, v in med.items() if n.startswith("builtin") and v == v]
            ratio = f"{min(builtin_vals) / ours_best:.2f}x" if builtin_vals else "n/a"
            cells = " | ".join(f"{v * 1e3:.1f}" if v == v else "-" for v in med.values())
            print(f"| {tokens} | {copy_bw / 1e9:.1f} | {matmul_rate / 1e9:.0f} | {floor * 1e3:.1f} | {hit} | {cells} | "
                  f"{ours_best / floor:.2f} | {ratio} |", flush=True)
        config.moe_backend = None


if __name__ == "__main__":
    main()
