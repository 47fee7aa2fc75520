"""One MoE layer at the real Qwen1.5-MoE-A2.7B shape (hidden 2048, 60 experts of 1408, top-4, shared 5632), on CPU:
our block (each available backend) vs transformers 5.23's built-in block (eager / grouped_mm / batched_mm, same
weights), against the floor = max(weights read once / measured copy bandwidth, FLOPs / measured large-matmul rate),
the two rates measured in every round beside the variants (medians).

    python benchmarks/moe_block.py [--dtype bfloat16 float32] [--tokens 1 16 256 1024] [--threads 2] [--repeats 7]

All variants run interleaved (round-robin) in one process; medians are reported. Needs transformers >= 5 for the
built-in rows (they are left out otherwise). The probes, models and round-robin are qwen2_moe_hf/bench.py's, which
`qwen2-moe-hf bench` also uses (bf16 beside int4 and decode, in one table).
"""

import argparse
import statistics

import torch

import qwen2_moe_hf
from qwen2_moe_hf.bench import (
    SHAPE,
    CleanCaches,
    CopyProbe,
    MatmulProbe,
    Variant,
    available_memory,
    builtin_available,
    builtin_block,
    floor_work,
    interleave,
    new_block,
    timed,
)


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
    have_builtin, why_not = builtin_available()
    if not have_builtin:
        print(f"built-in rows left out: {why_not}")

    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        # The best large-matmul rate this machine reaches, whatever the dtype (on AVX2 without native bf16: fp32).
        probes = {name: MatmulProbe(getattr(torch, name)) for name in ("bfloat16", "float32")}
        rates = {name: max(probe() for _ in range(2)) for name, probe in probes.items()}
        matmul_name = max(rates, key=rates.get)
        matmul_probe = probes[matmul_name]
        print(f"\n## {dtype_name}: large matmul 1024x2048x2816 at start: bf16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s, "
              f"fp32 {rates['float32'] / 1e9:.0f} GFLOP/s (the floor uses {matmul_name}, re-measured each round)")
        ours = new_block(SHAPE, dtype)
        config = ours.config
        blocks = {}  # name -> (block, the setup that selects the backend / implementation)
        for name, state in qwen2_moe_hf.env_report().items():
            if state == "available":
                blocks[f"ours[{name}]"] = (ours, lambda name=name: setattr(config, "moe_backend", name))
        if have_builtin:
            builtin, hf_config = builtin_block(ours, dtype)
            for impl in ("eager", "grouped_mm", "batched_mm"):
                blocks[f"builtin[{impl}]"] = (builtin, lambda impl=impl: setattr(hf_config, "_experts_implementation",
                                                                                 impl))

        header = ("| tokens | copy GB/s | matmul GFLOP/s | floor ms | experts hit | " + " | ".join(blocks)
                  + " | ours best / floor | builtin best / ours best |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for tokens in args.tokens:
            x = torch.randn(1, tokens, config.hidden_size, dtype=dtype)
            weights, flops, hit = floor_work(ours, x)
            floor = max(weights / start_bw, flops / rates[matmul_name])  # until the rounds have measured it
            variants = []
            with torch.no_grad():
                for name, (block, setup) in blocks.items():  # warm-up, and drop hopeless variants
                    setup()
                    if name.endswith("[batched_mm]"):  # gathers every selected expert's weights per token
                        need = tokens * config.num_experts_per_tok * 3 * config.hidden_size * \
                            config.moe_intermediate_size * x.element_size()
                        if need > available_memory() // 2:
                            print(f"{name} at {tokens} tokens left out: it would gather {need / 2**30:.0f} GiB")
                            continue
                    try:
                        first = timed(lambda: block(x))
                    except RuntimeError as exc:  # e.g. batched_mm gathers a weight copy per token: OOM at 1024
                        print(f"{name} at {tokens} tokens failed: {str(exc).splitlines()[0][:120]}")
                        continue
                    if args.skip_slow and first > 20 * floor:
                        continue
                    variants.append(Variant(name, lambda block=block: timed(lambda: block(x)), setup=setup))
                times, probed = interleave(variants, args.repeats, clean_caches,
                                           {"copy": copy_probe, "matmul": matmul_probe})
            copy_bw, matmul_rate = statistics.median(probed["copy"]), statistics.median(probed["matmul"])
            floor = max(weights / copy_bw, flops / matmul_rate)
            med = {n: statistics.median(times[n]) if n in times else float("nan") for n in blocks}
            ours_best = min(v for n, v in med.items() if n.startswith("ours") and v == v)
            builtin_vals = [v for n, v in med.items() if n.startswith("builtin") and v == v]
            ratio = f"{min(builtin_vals) / ours_best:.2f}x" if builtin_vals else "n/a"
            cells = " | ".join(f"{v * 1e3:.1f}" if v == v else "-" for v in med.values())
            print(f"| {tokens} | {copy_bw / 1e9:.1f} | {matmul_rate / 1e9:.0f} | {floor * 1e3:.1f} | {hit} | {cells} | "
                  f"{ours_best / floor:.2f} | {ratio} |", flush=True)
        config.moe_backend = None

if __name__ == "__main__":
    main()
