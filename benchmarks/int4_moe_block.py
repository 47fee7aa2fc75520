"""One MoE layer at the real Qwen1.5-MoE-A2.7B shape on CPU with GPTQ-Int4 experts (group 128, sym, like the
released checkpoint; the shared expert is int4 too): ours int4 vs ours bf16 (the `cpu` backend) vs auto-gptq's
QuantLinear torch path applied per expert (when auto_gptq is installed), and the int4 memory floor = bytes of
int4 weights + scales + zeros read once / copy bandwidth measured in every round beside the variants (median).

    python benchmarks/int4_moe_block.py [--tokens 1 16 256] [--threads 2] [--repeats 7]

All variants run interleaved in one process; medians are reported. The probes, the int4 block and the round-robin
are qwen2_moe_hf/bench.py's (`qwen2-moe-hf bench` prints int4 beside bf16, the built-in and decode).
"""

import argparse
import copy
import statistics

import torch

from qwen2_moe_hf.bench import (
    INT4,
    SHAPE,
    CleanCaches,
    CopyProbe,
    Variant,
    int4_block,
    int4_bytes,
    interleave,
    new_block,
    timed,
)
from qwen2_moe_hf.gptq.linear import use_blocked_layout
from qwen2_moe_hf.moe import route


def autogptq_block(int4, spec):
    """The same int4 tensors in auto-gptq's QuantLinear (its CPU torch path), fp16 like auto-gptq expects."""
    from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear

    block = copy.deepcopy(int4).to(torch.float16)
    for name, module in list(block.named_modules()):
        if type(module).__name__ != "GPTQLinear":
            continue
        ql = QuantLinear(spec.bits, spec.group_size, module.in_features, module.out_features, False)
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(ql, part, getattr(module, part).clone())
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, ql)
    block.config.moe_backend = "torch"  # the per-expert loop calling each QuantLinear
    return block


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--autogptq-max-tokens", type=int, default=16,
                        help="run auto-gptq's torch path only up to this many tokens (it takes ~100 s at 256)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    copy_probe = CopyProbe()  # measured in every round beside the variants, as in moe_block.py
    clean_caches = CleanCaches()  # each timed call starts from caches of clean, unrelated data, as in moe_block.py
    print(f"torch {torch.__version__}, {args.threads} threads; copy bandwidth at start "
          f"{max(copy_probe() for _ in range(3)) / 1e9:.1f} GB/s (read+write)")

    spec = INT4  # group 128, sym, like the released checkpoint
    bf16 = new_block(SHAPE, torch.bfloat16)
    config = bf16.config
    blocked = int4_block(bf16, spec).eval()  # as a CPU load leaves it: qweight blocked by 64 columns
    int4 = copy.deepcopy(blocked)
    use_blocked_layout(int4, False)  # the checkpoint's layout
    variants = {"ours bf16 [cpu]": (bf16, torch.bfloat16), "ours int4 (bf16 act)": (blocked, torch.bfloat16),
                "ours int4 checkpoint layout (bf16 act)": (int4, torch.bfloat16),
                "ours int4 (fp16 act)": (copy.deepcopy(blocked).to(torch.float16), torch.float16)}
    try:
        variants["auto-gptq QuantLinear per expert (fp16)"] = (autogptq_block(int4, spec), torch.float16)
    except ImportError:
        print("auto_gptq is not installed: its column is left out (pip install auto-gptq==0.7.1 peft==0.9.0)")

    header = ("| tokens | int4 floor ms | " + " | ".join(variants) +
              " | bf16 / int4 | checkpoint layout / blocked | auto-gptq / int4 |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for tokens in args.tokens:
        x = torch.randn(1, tokens, config.hidden_size)
        _, ids = route(bf16.gate(x.to(torch.bfloat16).reshape(-1, config.hidden_size)), config.num_experts_per_tok,
                       config.norm_topk_prob)
        weight_bytes = int4_bytes(config, ids.unique().numel(), spec.group_size)
        run = [Variant(name, lambda block=block, xd=x.to(dtype): timed(lambda: block(xd)))
               for name, (block, dtype) in variants.items()
               if not (name.startswith("auto-gptq") and tokens > args.autogptq_max_tokens)]
        with torch.no_grad():
            for v in run:
                v.measure()  # warm-up (builds the CPU ops on first use)
            times, probed = interleave(run, args.repeats, clean_caches, {"copy": copy_probe})
        floor = weight_bytes / statistics.median(probed["copy"])
        med = {n: statistics.median(times[n]) if n in times else float("nan") for n in variants}
        ours = med["ours int4 (bf16 act)"]
        agptq = med.get("auto-gptq QuantLinear per expert (fp16)")
        cells = " | ".join(f"{v * 1e3:.1f}" if v == v else "-" for v in med.values())
        ratio = f"{agptq / med['ours int4 (fp16 act)']:.1f}x" if agptq and agptq == agptq else "n/a"
        layout = med["ours int4 checkpoint layout (bf16 act)"] / ours
        print(f"| {tokens} | {floor * 1e3:.2f} | {cells} | {med['ours bf16 [cpu]'] / ours:.2f}x | {layout:.2f}x | "
              f"{ratio} |",
              flush=True)


if __name__ == "__main__":
    main()
