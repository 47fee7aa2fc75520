"""Peak memory while loading a checkpoint, against its size on disk.

Writes a checkpoint at the real Qwen1.5-MoE-A2.7B layer shape (hidden 2048, 60 experts of 1408, shared 5632;
a few layers and a smaller vocabulary so it stays quick) with random tensors, then loads it with
AutoModelForCausalLM.from_pretrained in a fresh process and reports the peak RSS of that process minus its RSS
just before the call (imports and compiled ops already loaded).

    python benchmarks/load_memory.py [--kind gptq bf16] [--layers 4] [--vocab 32000] [--keep DIR]

gptq: an int4 checkpoint (group 128, sym, fp16 for everything else, like Qwen's release), loaded in float16.
bf16: the same model in bfloat16 (transformers' loader with our model class).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

SHAPE = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, intermediate_size=5632, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=4096, tie_word_embeddings=False)
SHARD_BYTES = 2 * 10**9


def write_checkpoint(folder, kind, layers, vocab):
    """Random tensors with the names and shapes the hub's checkpoints use; never the whole model in memory."""
    from safetensors.torch import save_file

    import qwen2_moe_hf  # noqa: F401
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from qwen2_moe_hf.gptq.format import GPTQSpec
    from qwen2_moe_hf.gptq.quantize import QUANTIZED

    config = Qwen2MoeConfig(num_hidden_layers=layers, vocab_size=vocab, **SHAPE)
    with torch.device("meta"):
        skeleton = Qwen2MoeForCausalLM(config)
    spec = GPTQSpec(bits=4, group_size=128, sym=True)
    dtype = torch.float16 if kind == "gptq" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append((name, list(current)))
        current, size = {}, 0

    def add(name, tensor):
        nonlocal size
        if size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
            flush()
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()

    for name, param in skeleton.state_dict().items():
        if kind == "gptq" and QUANTIZED.match(name):
            out_features, in_features = param.shape
            prefix = name[: -len(".weight")]
            shapes = spec.tensor_shapes(in_features, out_features)
            add(f"{prefix}.qweight", torch.randint(-2**31, 2**31 - 1, shapes["qweight"], generator=gen,
                                                  dtype=torch.int32))
            add(f"{prefix}.qzeros", torch.full(shapes["qzeros"], 0x77777777, dtype=torch.int32))
            add(f"{prefix}.scales", (torch.rand(shapes["scales"], generator=gen) * 1e-3).to(torch.float16))
            add(f"{prefix}.g_idx", spec.group_of(in_features))
            if prefix.endswith(("q_proj", "k_proj", "v_proj")):
                add(f"{prefix}.bias", torch.zeros(out_features, dtype=torch.float16))
        elif not (kind == "gptq" and name.endswith(".bias") and QUANTIZED.match(name[:-5] + ".weight")):
            add(name, (torch.randn(param.shape, generator=gen) * 0.02).to(dtype))
    flush()
    total = len(shards)
    for i, (name, keys) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(folder, name), os.path.join(folder, final))
        weight_map.update({k: final for k in keys})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    if kind == "gptq":
        config_dict["quantization_config"] = spec.to_dict()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_dict, f)
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))


def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def rss_bytes():
    return status_bytes("VmRSS")


def reset_peak():
    """Restart the peak-RSS count (VmHWM) from now, so earlier peaks (imports, a JIT build) do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(folder, kind):
    """Runs in a fresh process: load, then print RSS before, peak and after (bytes) as JSON."""
    import transformers

    import qwen2_moe_hf  # noqa: F401
    from qwen2_moe_hf import compat
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    load_cpu_ops()
    exact = reset_peak()
    before = rss_bytes()
    dtype = torch.float16 if kind == "gptq" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **compat.dtype_kwarg(dtype))
    # Without clear_refs the lifetime peak is all there is (it may include the imports' own peak).
    peak = status_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The tensors the model holds, not state_dict(): that gives a CPU load's blocked int4 weights as unblocked copies.
    tensors = list(model.parameters()) + list(model.buffers())
    held = sum(t.numel() * t.element_size() for t in tensors)
    after = rss_bytes()
    # transformers 5.x may leave weights memory-mapped and untouched: read each once to see what they occupy.
    with torch.no_grad():
        for tensor in tensors:
            tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].float().sum()
    print(json.dumps({"before": before, "peak": peak, "after": after, "touched": rss_bytes(), "model_bytes": held}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", nargs="+", default=["gptq", "bf16"], choices=["gptq", "bf16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", help="write the checkpoints here and keep them")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import transformers

    print(f"torch {torch.__version__} | transformers {transformers.__version__} | {args.layers} layers at the real "
          f"shape, vocab {args.vocab}")
    print("| checkpoint | size on disk GB | model tensors GB | RSS before GB | peak RSS while loading GB | "
          "(peak - before) / disk | RSS once every weight was read GB |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kind:
        with tempfile.TemporaryDirectory(dir=args.keep) as folder:
            disk = write_checkpoint(folder, kind, args.layers, args.vocab)
            out = subprocess.run([sys.executable, __file__, "--child", folder, kind], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"loading the {kind} checkpoint failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grown = r["peak"] - r["before"]
            print(f"| {kind} | {disk / 1e9:.2f} | {r['model_bytes'] / 1e9:.2f} | {r['before'] / 1e9:.2f} | "
                  f"{r['peak'] / 1e9:.2f} | {grown / disk:.2f}x | {r['touched'] / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
