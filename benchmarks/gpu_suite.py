"""Everything GPU-side in one command (meant for one H200, under 8 minutes):

    python benchmarks/gpu_suite.py [--tokens 1 16 64 256 1024 4096] [--decode-layers 24] [--skip-tests]

1. builds the CUDA extension (qwen2_moe_hf/kernels/csrc/cuda) for this GPU and loads it;
2. runs the GPU-marked tests (`pytest -m gpu`) and the backend tests with CUDA tensors;
3. prints one MoE layer at the real Qwen1.5-MoE-A2.7B shape, bf16: our backends vs transformers 5.23's built-in
   block (grouped_mm / batched_mm, same weights) against the floor = max(weights read once / measured copy
   bandwidth, FLOPs / measured bf16 matmul rate), for 1 ... 4096 tokens;
4. prints the routed experts with 4-bit GPTQ weights (the Triton family's int4 variant,
   qwen2_moe_hf/kernels/triton_moe.py) at the same shape,
   group 128, random nibbles, for the same token counts, against the int4 floor (int4 weights + scales + zeros of
   the hit experts read once / copy bandwidth, beside FLOPs / bf16 matmul rate), with a bf16 accuracy check;
5. prints end-to-end batch-1 greedy decode tokens/s of a real-shape model with random weights (ours, each backend,
   and the built-in), against the bandwidth ceiling of reading the active weights once per token.

Paste its tables into docs/benchmarks.md.

    python benchmarks/gpu_suite.py --tune triton_configs.json

only re-tunes the Triton kernels' tile table on this GPU (qwen2_moe_hf/kernels/triton_moe.py `tune`) and writes it
as JSON, which the launchers read when env QWEN2_MOE_HF_TRITON_CONFIGS names it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import moe_block  # noqa: E402  (the built-in block with our weights, shared with the CPU benchmark)

SHAPE = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, intermediate_size=5632, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=151936, max_position_embeddings=4096)


def cuda_time(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / cuda_time(lambda: b.copy_(a), repeats=10)


def matmul_rate():
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192 ** 3 / cuda_time(lambda: a @ b, repeats=10)


def build_and_test(skip_tests):
    from qwen2_moe_hf.kernels.build import load_cpu_ops, load_cuda_ops

    start = time.perf_counter()
    print("cuda ops:", load_cuda_ops(), f"({time.perf_counter() - start:.0f} s)")
    print("cpu ops:", load_cpu_ops())
    if not skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or not gpu",
               "modeling_tests/test_cuda_extension.py", "modeling_tests/test_triton_kernels.py",
               "modeling_tests/test_moe_backends.py", "modeling_tests/test_parity.py",
               "modeling_tests/test_gptq_triton.py"]
        env = dict(os.environ, TRITON_INTERPRET="0")
        result = subprocess.run(cmd, cwd=ROOT, env=env)
        print("gpu tests:", "passed" if result.returncode == 0 else f"FAILED (exit {result.returncode})")


def block_table(tokens_list, bw, rate):
    import qwen2_moe_hf
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    from qwen2_moe_hf.moe import route

    config = Qwen2MoeConfig(**SHAPE, num_hidden_layers=1)
    ours = Qwen2MoeSparseMoeBlock(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    builtin, builtin_cfg = moe_block.builtin_block(ours, torch.bfloat16)  # same weights, experts fused
    builtin = builtin.to("cuda").eval()
    backends = [n for n, s in qwen2_moe_hf.env_report().items() if s == "available" and n != "cpu"]
    names = [f"ours[{b}]" for b in backends] + ["builtin[grouped_mm]", "builtin[batched_mm]"]
    print(f"\n| tokens | floor us | {' | '.join(names)} | ours best / floor | builtin best / ours best |")
    print("|" + "---|" * (len(names) + 4))
    for tokens in tokens_list:
        x = torch.randn(1, tokens, 2048, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            _, ids = route(ours.gate(x.view(-1, 2048)), 4, False)
        hit = ids.unique().numel()
        weights = (hit * 3 * 2048 * 1408 + 3 * 2048 * 5632 + 61 * 2048) * 2
        flops = 2 * tokens * 2048 * (3 * 4 * 1408 + 3 * 5632 + 61)
        floor = max(weights / bw, flops / rate)
        results = []
        with torch.no_grad():
            for b in backends:
                config.moe_backend = b
                results.append(cuda_time(lambda: ours(x)))
            for impl in ("grouped_mm", "batched_mm"):
                builtin_cfg._experts_implementation = impl
                try:
                    results.append(cuda_time(lambda: builtin(x)))
                except Exception as exc:  # an implementation may not support this GPU / dtype
                    print(f"builtin[{impl}] failed: {exc}")
                    results.append(float("nan"))
        ours_best = min(results[: len(backends)])
        builtin_best = min(r for r in results[len(backends):] if r == r)
        cells = " | ".join(f"{r * 1e6:.0f}" for r in results)
        print(f"| {tokens} | {floor * 1e6:.0f} | {cells} | {ours_best / floor:.2f} | {builtin_best / ours_best:.2f}x |",
              flush=True)
    config.moe_backend = None


def int4_bank(hidden, inter, experts, group, device):
    """Per-expert (qweight, qzeros, scales, g_idx) for gate / up (hidden -> inter) and down (inter -> hidden):
    random int32 words are random nibbles; scales ~2e-3 keep activations near 1."""
    def linear(k, n):
        groups = -(-k // group)
        return (torch.randint(-2**31, 2**31, (k // 8, n), dtype=torch.int32, device=device),
                torch.randint(-2**31, 2**31, (groups, n // 8), dtype=torch.int32, device=device),
                (torch.rand(groups, n, device=device) * 2e-3 + 1e-3).half(),
                torch.arange(k, dtype=torch.int32, device=device) // group)
    return ([linear(hidden, inter) for _ in range(experts)], [linear(hidden, inter) for _ in range(experts)],
            [linear(inter, hidden) for _ in range(experts)])


def int4_reference(x, ids, weights, gate, up, down):
    """The routed experts in fp32 on dequantized weights (format.dequantize), one pass per hit expert."""
    from qwen2_moe_hf.gptq.format import dequantize

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        w_gate, w_up, w_down = (dequantize(*lin[e], dtype=torch.float32) for lin in (gate, up, down))
        xe = x[token].float()
        act = torch.nn.functional.silu(xe @ w_gate.t()) * (xe @ w_up.t())
        out.index_add_(0, token, (act @ w_down.t()) * weights[token, slot, None].float())
    return out


def int4_table(tokens_list, bw, rate, group=128):
    try:
        from qwen2_moe_hf.kernels.triton_moe import expert_tables, routed_experts
    except ImportError as exc:
        print(f"\nint4 rows skipped: {exc}")
        return
    from qwen2_moe_hf.moe import route

    hidden, inter, experts, k = 2048, 1408, 60, 4
    gate, up, down = int4_bank(hidden, inter, experts, group, "cuda")
    tables = expert_tables(gate, up, down, int4=True, zero_offset=1)  # once, as the backend's prepared weights do
    per_expert = sum(t.numel() * t.element_size() for lin in (gate, up, down) for t in lin[0])
    print(f"\nrouted experts, int4 GPTQ (group {group}), bf16 activations, Triton")
    print("| tokens | int4 floor us | compute floor us | int4 us | / floor | bf16 rel err |")
    print("|" + "---|" * 6)
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        weights, ids = route(torch.randn(tokens, experts, device="cuda"), k, False)
        weights = weights.to(torch.bfloat16)
        floor = ids.unique().numel() * per_expert / bw
        compute = 2 * tokens * k * 3 * hidden * inter / rate
        with torch.no_grad():
            got = routed_experts(x, ids, weights, tables)
            ref = int4_reference(x, ids, weights, gate, up, down)  # bf16 is checked here only (not interpreted)
            err = ((got.float() - ref).norm() / ref.norm()).item()
            elapsed = cuda_time(lambda: routed_experts(x, ids, weights, tables))
        print(f"| {tokens} | {floor * 1e6:.0f} | {compute * 1e6:.0f} | {elapsed * 1e6:.0f} | "
              f"{elapsed / max(floor, compute):.2f} | {err:.1e} |", flush=True)


def decode_rate(model, ids, new_tokens):
    """Greedy batch-1 tokens/s after a short warm-up generate."""
    model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def decode_table(layers, new_tokens=64):
    from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_model

    import qwen2_moe_hf
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**SHAPE, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2MoeForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 151936, (1, 32), device="cuda")
    active = sum(p.numel() for n, p in model.named_parameters() if "experts." not in n)
    active += layers * 4 * 3 * 2048 * 1408 - 151936 * 2048  # 4 routed experts per layer; one embedding row
    ceiling = copy_bandwidth() / (2 * active)
    print(f"\nbatch-1 greedy decode, {layers} layers, {new_tokens} new tokens; ceiling {ceiling:.0f} tok/s")
    print("| model | tokens/s | of ceiling |\n|---|---|---|")
    for backend in [n for n, s in qwen2_moe_hf.env_report().items() if s == "available" and n != "cpu"]:
        config.moe_backend = backend
        rate = decode_rate(model, ids, new_tokens)
        print(f"| ours[{backend}] | {rate:.0f} | {rate / ceiling:.0%} |", flush=True)
    state = {k: v for k, v in model.state_dict().items()}
    del model
    builtin = hf_model.Qwen2MoeForCausalLM(hf_model.Qwen2MoeConfig(**SHAPE, num_hidden_layers=layers))
    builtin = builtin.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        builtin.load_state_dict({k: v for k, v in state.items() if ".experts." not in k}, strict=False)
        for i, layer in enumerate(builtin.model.layers):
            prefix = f"model.layers.{i}.mlp.experts."
            for e in range(60):
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat(
                    [state[f"{prefix}{e}.gate_proj.weight"], state[f"{prefix}{e}.up_proj.weight"]]))
                layer.mlp.experts.down_proj[e].copy_(state[f"{prefix}{e}.down_proj.weight"])
    for impl in ("grouped_mm", "batched_mm"):
        builtin.config._experts_implementation = impl
        rate = decode_rate(builtin, ids, new_tokens)
        print(f"| builtin[{impl}] | {rate:.0f} | {rate / ceiling:.0%} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--decode-layers", type=int, default=24)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tune", metavar="JSON", help="only re-tune the Triton tile table on this GPU (kernels/"
                        "triton_moe.py tune), write it to JSON; use it with QWEN2_MOE_HF_TRITON_CONFIGS=JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    if args.tune:
        from qwen2_moe_hf.kernels.triton_moe import tune

        table = tune(args.tune)
        print(f"wrote {args.tune}: {table}\nuse it: QWEN2_MOE_HF_TRITON_CONFIGS={args.tune}; then recompile the "
              f"report: python -m qwen2_moe_hf.kernels.triton_aot --all")
        return
    build_and_test(args.skip_tests)
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    block_table(args.tokens, bw, rate)
    int4_table(args.tokens, bw, rate)
    decode_table(args.decode_layers)


if __name__ == "__main__":
    main()
