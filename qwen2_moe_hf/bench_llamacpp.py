"""Whole-model batch-1 CPU decode: our plugin vs llama.cpp (llama-cpp-python) vs transformers' built-in qwen2_moe,
on the same random weights at the real Qwen1.5-MoE-A2.7B layer shape.

    qwen2-moe-hf bench --vs-llamacpp [--layers 4] [--prompt 128] [--new-tokens 128] [--rounds 3] [--threads 2]
                                     [--vocab 151936] [--workdir DIR] [--json F] [--quick]
    (the same: python benchmarks/decode_vs_llamacpp.py ...)

Needs (beside this package): `gguf` and `llama-cpp-python` (which compiles llama.cpp for this machine on install):
pip install qwen2_moe_hf[llamacpp].

What it does:
1. Writes a random checkpoint with --layers real-shape layers (hidden 2048, 60 experts of 1408, top-4, shared expert
   5632 with its sigmoid gate, 16 heads, q/k/v bias, untied lm_head, real vocabulary) in the hub's per-expert layout,
   bf16 on disk, one layer at a time; from it our GPTQ-Int4 (`qwen2-moe-hf quantize`: RTN, group 128, sym) and an
   f16 GGUF (to_gguf.py), which llama.cpp's own quantizer turns into Q4_0 and Q4_K_M, each with token
   embeddings and output kept f16 (like our GPTQ's fp16 embeddings / lm_head) and with llama.cpp's default types.
2. Rows: ours bf16, ours GPTQ-Int4 (in bf16, and in fp16: what the blog's code loads, no dtype given), the
   built-in bf16 (transformers' own class: a process that never imports this package; the best of its experts
   implementations, picked on a warm-up), llama.cpp f16 / Q4_0 / Q4_K_M.
   Each measurement is one greedy generate of --new-tokens after a --prompt-token prompt (random ids, the same for
   every row), in a fresh process per row and round (one model in memory at a time; no OpenMP pools shared between
   torch and ggml), after a short warm-up generate. Rounds interleave the rows; cells are medians over rounds.
   Ours / built-in: prefill = from the generate call to the first token's logits, decode = the time between the
   first and the last token's logits / (new tokens - 1). llama.cpp: its own timings (llama_perf_context: prompt
   eval and eval), with the same prompt and the same number of single-token decode steps, greedy.
3. Floor: the bytes one decode step must read (each row's own file: every tensor, top-k/E of the expert tensors,
   one row of the embedding) / the read bandwidth measured between rounds in the same run (bench.py's ReadProbe).

Prints one markdown table; --json writes every sample. --workdir keeps (and reuses) the files: ~20 GB at 4 layers.
Only the files the chosen --rows need are made, each in its own process (its time and peak RSS go to made.json and
under the table; our rows also report the load's peak RSS growth over the checkpoint's size on disk).

The real size (issue 15): 24 layers, where the bf16 checkpoint (29 GB) does not fit in 24 GiB of memory and the
disk may not hold every file at once:
    qwen2-moe-hf bench --vs-llamacpp --layers 24 --workdir DIR --rows "ours GPTQ" "Q4_0 (embd+output f16)" --discard
--discard deletes the bf16 checkpoint and the f16 GGUF as soon as no chosen row still needs them (peak ~65 GB).

llama.cpp on an AMX Xeon: llama-cpp-python 0.3.36 built natively (GGML_NATIVE, the pip default) puts Q4_0 / Q4_K /
Q8_0 weights in ggml's AMX buffers, and there its mul_mat segfaulted on every multi-token batch (seen on this
project's AMX build machine, tiny and real shapes; single-token decode ran, ~15x slower). A row that crashes so is
re-measured with use_extra_bufts=false (no AMX, but also no CPU_REPACK) and marked. For llama.cpp's fast Q4 path
on such a machine, build it without AMX (its repacked AVX-512 kernels then serve Q4_0 / Q4_K):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --force-reinstall --no-deps \
      --no-cache-dir llama-cpp-python
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

# This file is also run by path in the measuring children (see measure()): it imports nothing of the package at
# module level, so the built-in row's process never imports the plugin.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # where `qwen2_moe_hf` imports from (an install or a source checkout)

# The real Qwen1.5-MoE-A2.7B (../shared/NOTES.md), --layers of it.
REAL = dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
            num_experts=60, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=16,
            vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6)
# --quick: every path runs (GPTQ group 128 and Q4_K's 256-wide rows still fit), nothing real is measured.
QUICK = dict(REAL, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
             shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1024)
STD = 0.02  # random weights; norms are ones (see bench.randomize_)

# (row name, kind, artifact). Order = the order within each round.
# A GPTQ row as the blog's code loads it, with no dtype given ("auto": the checkpoint's fp16); every other row of
# ours and the built-in's loads in bf16.
GPTQ_FP16 = "ours GPTQ-Int4 (fp16: its default dtype)"
ROWS: List[Tuple[str, str, str]] = [
    ("ours bf16", "ours", "ckpt"),
    ("ours GPTQ-Int4", "ours", "gptq"),
    (GPTQ_FP16, "ours", "gptq"),
    ("built-in bf16", "builtin", "ckpt"),
    ("llama.cpp f16", "llama", "f16.gguf"),
    ("llama.cpp Q4_0 (embd+output f16)", "llama", "q4_0-f16eo.gguf"),
    ("llama.cpp Q4_K_M (embd+output f16)", "llama", "q4_k_m-f16eo.gguf"),
    ("llama.cpp Q4_0 (llama.cpp default embd/output)", "llama", "q4_0.gguf"),
    ("llama.cpp Q4_K_M (llama.cpp default embd/output)", "llama", "q4_k_m.gguf"),
]
REF_F16 = "llama.cpp f16"
REF_Q4 = "llama.cpp Q4_0 (embd+output f16)"


# ---------------------------------------------------------------------------------------------------------------
# The files


def write_random_checkpoint(dst: str, shape: Dict[str, Any], layers: int, seed: int = 0) -> str:
    """Hub layout (per-expert keys, one safetensors shard per layer + one for embeddings / norm / lm_head, with
    model.safetensors.index.json), bf16, random normal(0, STD), norms one. Built one layer at a time so that at most
    one layer (~1.1 GB at the real shape) is in memory."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, i_exp, i_sh = shape["hidden_size"], shape["moe_intermediate_size"], shape["shared_expert_intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    vocab, experts = shape["vocab_size"], shape["num_experts"]

    def rnd(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * STD).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: Dict[str, str] = {}
    total = 0

    def shard(name: str, tensors: Dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    n_shards = layers + 1
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h)}
        for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv * head_dim), ("v_proj", kv * head_dim)):
            t[p + f"self_attn.{proj}.weight"] = rnd(rows, h)
            t[p + f"self_attn.{proj}.bias"] = rnd(rows)
        t[p + "self_attn.o_proj.weight"] = rnd(h, heads * head_dim)
        t[p + "mlp.gate.weight"] = rnd(experts, h)
        for e in range(experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(i_exp, h)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(i_exp, h)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(h, i_exp)
        t[p + "mlp.shared_expert.gate_proj.weight"] = rnd(i_sh, h)
        t[p + "mlp.shared_expert.up_proj.weight"] = rnd(i_sh, h)
        t[p + "mlp.shared_expert.down_proj.weight"] = rnd(h, i_sh)
        t[p + "mlp.shared_expert_gate.weight"] = rnd(1, h)
        shard(f"model-{layer + 1:05d}-of-{n_shards:05d}.safetensors", t)
        del t
    shard(f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors",
          {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": ones(h), "lm_head.weight": rnd(vocab, h)})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    special = min(151643, vocab - 1)
    config = {  # the hub's 4.39 form, as Qwen/Qwen1.5-MoE-A2.7B ships it
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
        "num_hidden_layers": layers, "max_position_embeddings": 8192, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 21, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "attention_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "bos_token_id": special, "eos_token_id": special,
        **{k: shape[k] for k in REAL},
    }
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dst


def _done(path: str) -> bool:
    return os.path.exists(path + ".done")


def _mark(path: str) -> None:
    open(path + ".done", "w").close()


# What each made artifact is made from (the checkpoint is made from nothing).
SOURCES = {"gptq": "ckpt", "f16.gguf": "ckpt", "q4_0-f16eo.gguf": "f16.gguf", "q4_k_m-f16eo.gguf": "f16.gguf",
           "q4_0.gguf": "f16.gguf", "q4_k_m.gguf": "f16.gguf"}


def _run_child(code: str, logfile: str) -> Dict[str, float]:
    """Run `code` in a fresh Python, output to logfile; its wall time and peak RSS (that process's own, os.wait4)."""
    start = time.perf_counter()
    with open(logfile, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{code[:120]}... failed (exit {proc.returncode}); see {logfile}")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024}


def _read_made(workdir: str) -> Dict[str, Any]:
    path = os.path.join(workdir, "made.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _folder_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


def prepare(workdir: str, shape: Dict[str, Any], layers: int, threads: int, log: Any,
            wanted: Sequence[str] = (), discard: bool = False) -> Dict[str, str]:
    """The artifacts the rows need (`wanted`; all when empty), made once (reused from --workdir when its settings
    match), each in a child process whose time and peak RSS go to made.json. With `discard`, a source that no wanted
    artifact still needs is deleted as soon as its last product exists (the 24-layer run: a 29 GB bf16 checkpoint
    and a 29 GB f16 GGUF never sit on disk beside all their products). The bf16 checkpoint's tensor sizes are kept
    beside it in ckpt.sizes.json for the floor."""
    stamp = os.path.join(workdir, "settings.json")
    want = {"shape": shape, "layers": layers, "std": STD, "version": 1}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) != want:
                raise SystemExit(f"--workdir {workdir}: holds files made with other settings ({stamp}); use "
                                 "another folder or empty it")
    else:
        os.makedirs(workdir, exist_ok=True)
        with open(stamp, "w") as f:
            json.dump(want, f)
    paths = {name: os.path.join(workdir, name) for _, _, name in ROWS}
    made_file = os.path.join(workdir, "made.json")
    made = _read_made(workdir)
    wanted = set(wanted or paths)

    def needed(name: str) -> bool:  # wanted, or the source of something wanted that is not made yet
        return name in wanted or any(src == name and needed(product) and not _done(paths[product])
                                     for product, src in SOURCES.items())

    use = f"import sys; sys.path.insert(0, {ROOT!r}); "
    steps = [("ckpt", f"the random bf16 checkpoint ({layers} layers)",
              use + "from qwen2_moe_hf import bench_llamacpp as d; "
              f"d.write_random_checkpoint({paths['ckpt']!r}, {shape!r}, {layers})"),
             # The user's command, streaming from the bf16 checkpoint.
             ("gptq", "our GPTQ-Int4 checkpoint (qwen2-moe-hf quantize: RTN, group 128, sym)",
              use + "from qwen2_moe_hf.cli import main; "
              f"sys.exit(main(['quantize', '--no-progress', {paths['ckpt']!r}, {paths['gptq']!r}]))"),
             ("f16.gguf", "the f16 GGUF (to_gguf.py)",
              use + "from qwen2_moe_hf import to_gguf; "
              f"to_gguf.convert({paths['ckpt']!r}, {paths['f16.gguf']!r}, 'f16')")]
    for name, kind, keep in (("q4_0-f16eo.gguf", "Q4_0", True), ("q4_k_m-f16eo.gguf", "Q4_K_M", True),
                             ("q4_0.gguf", "Q4_0", False), ("q4_k_m.gguf", "Q4_K_M", False)):
        # llama.cpp's quantizer logs every tensor: a child with its log in a file, not in the table.
        steps.append((name, f"{kind} GGUF ({'token_embd/output f16' if keep else 'llama.cpp default token_embd/output'})",
                      use + "from qwen2_moe_hf import to_gguf; "
                      f"to_gguf.quantize({paths['f16.gguf']!r}, {paths[name]!r}, {kind!r}, {keep!r}, {threads})"))
    for name, what, code in steps:
        path = paths[name]
        if _done(path) or not needed(name):
            continue
        print(f"  making {what} ...", file=log, flush=True)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        made[name] = _run_child(code, path + ".log")
        made[name]["disk_bytes"] = _folder_bytes(path)
        if name == "ckpt":
            with open(path + ".sizes.json", "w") as f:  # read back by _safetensors_sizes once ckpt is discarded
                json.dump(_safetensors_sizes(path), f)
        _mark(path)
        with open(made_file, "w") as f:
            json.dump(made, f, indent=1)
        m = made[name]
        print(f"  made {what} in {m['seconds']:.0f} s: {m['disk_bytes'] / 1e9:.2f} GB on disk, peak RSS of the "
              f"process {m['peak_rss_bytes'] / 2**30:.2f} GiB", file=log, flush=True)
        if discard:
            for source in set(SOURCES.values()):
                if os.path.exists(paths[source]) and not needed(source):
                    print(f"  deleting {source} (no wanted file needs it any more)", file=log, flush=True)
                    (shutil.rmtree if os.path.isdir(paths[source]) else os.remove)(paths[source])
                    os.remove(paths[source] + ".done")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Bytes per decode step (the floor), from each row's own file


def _safetensors_sizes(folder: str) -> Dict[str, int]:
    if not os.path.exists(folder) and os.path.exists(folder + ".sizes.json"):  # discarded after use (--discard)
        with open(folder + ".sizes.json") as f:
            return json.load(f)
    sizes = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


def _gguf_sizes(path: str) -> Dict[str, int]:
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def decode_bytes(path: str, shape: Dict[str, Any]) -> int:
    """Bytes a batch-1 decode step reads: all of every tensor except top-k/E of the routed experts and one row of
    the token embedding (the KV cache of a short context is left out)."""
    sizes = _gguf_sizes(path) if path.endswith(".gguf") else _safetensors_sizes(path)
    frac = shape["num_experts_per_tok"] / shape["num_experts"]
    total = 0.0
    for key, n in sizes.items():
        if ".experts." in key or "_exps." in key:
            n *= frac
        elif "embed_tokens" in key or key.startswith("token_embd"):
            n /= shape["vocab_size"]
        total += n
    return int(total)


def gguf_types(path: str) -> Dict[str, str]:
    """The types llama.cpp's quantizer chose per kind of tensor, over all layers (Q4_K_M mixes them by layer), for
    the report: {'ffn_down_exps': 'Q5_0/Q8_0', ...}."""
    import gguf

    kinds: Dict[str, List[str]] = {}
    for t in gguf.GGUFReader(path).tensors:
        key = t.name.split(".", 2)[2] if t.name.startswith("blk.") else t.name
        key = key.replace(".weight", "")
        if not key.endswith(("norm", "bias")):
            names = kinds.setdefault(key, [])
            if t.tensor_type.name not in names:
                names.append(t.tensor_type.name)
    return {key: "/".join(names) for key, names in kinds.items()}


# ---------------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_torch(spec: Dict[str, Any]) -> Dict[str, Any]:
    ours = spec["kind"] == "ours"
    if not ours:
        # The built-in must load even if something imported the plugin (it is never imported in this process).
        os.environ["QWEN2_MOE_HF_OVERRIDE"] = "0"
    import torch

    torch.set_num_threads(spec["threads"])
    if ours:
        sys.path.insert(0, ROOT)
        import qwen2_moe_hf  # noqa: F401  (puts our classes in charge of model_type qwen2_moe)
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    # Peak RSS of the load alone: restart the kernel's high-water mark (VmHWM) just before it.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    dtype = spec.get("dtype", "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    model.eval()
    load_s = time.perf_counter() - start
    load_peak = _status_bytes("VmHWM") - before
    module = type(model).__module__
    if ours != module.startswith("qwen2_moe_hf"):
        raise RuntimeError(f"{spec['row']}: loaded {module}.{type(model).__name__}, not the intended class")
    ids = torch.tensor([spec["prompt_ids"]])
    n = spec["new_tokens"]

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: List[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.times.append(time.perf_counter())
            return scores

    def run(prompt: Any, new: int) -> Tuple[float, float]:
        clock = Clock()
        t0 = time.perf_counter()
        # min_new_tokens / eos None: random weights may pick the end token early; every run decodes `new` tokens.
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                       eos_token_id=None, logits_processor=LogitsProcessorList([clock]))
        if len(clock.times) != new:
            raise RuntimeError(f"generate made {len(clock.times)} steps, not {new}")
        return clock.times[0] - t0, (clock.times[-1] - clock.times[0]) / max(new - 1, 1)

    impl = None
    with torch.no_grad():
        warm = min(8, n)
        if not ours and hasattr(model.config, "_experts_implementation"):
            # The built-in's best experts implementation here, as bench.py reports it: pick on warm-up runs.
            # Picked on decode steps after a short prompt: batched_mm gathers every selected expert's weights per
            # token, GBs for a 128-token prefill. The pick then serves prefill and decode alike.
            best = {}
            short = ids[:, :8]
            for candidate in ("eager", "grouped_mm", "batched_mm"):
                model.config._experts_implementation = candidate
                try:
                    run(short, warm)
                    best[candidate] = run(short, warm)[1]
                except RuntimeError as exc:
                    print(f"built-in {candidate}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
            if not best:
                raise RuntimeError("no experts implementation of the built-in ran")
            impl = min(best, key=best.get)
            model.config._experts_implementation = impl
        run(ids, warm)  # warm-up: first-call costs (op builds, allocator) belong to no row
        prefill_s, decode_s = run(ids, n)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "load_s": load_s, "peak_rss_gib": _rss_gib(),
            "load_peak_growth_bytes": load_peak,
            "impl": impl, "class": f"{module}.{type(model).__name__}"}


def child_llama(spec: Dict[str, Any]) -> Dict[str, Any]:
    import llama_cpp
    import numpy as np

    prompt, n = spec["prompt_ids"], spec["new_tokens"]
    if not spec.get("extra_bufts", True):
        # llama_model_params.use_extra_bufts = false: no AMX / CPU_REPACK weight buffers. Llama() does not expose
        # it; it reads the defaults from llama_cpp.llama_cpp at construction.
        import llama_cpp.llama_cpp as lc

        defaults = lc.llama_model_default_params

        def no_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        lc.llama_model_default_params = no_extra_bufts
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=len(prompt) + n + 16, n_batch=max(len(prompt), 32),
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - start
    ctx = llm.ctx
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # logits_all=False: Llama.eval keeps no scores; read the last output row from llama.cpp directly.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run(tokens: Sequence[int], new: int) -> Tuple[float, float, Dict[str, float]]:
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        # llama.cpp books a decode's time when the context synchronizes (normally when logits are read); Llama.eval
        # with logits_all=False reads none, so without these calls the prompt's time and tokens would be booked
        # together with the first single-token step.
        llm.eval(list(tokens))
        llama_cpp.llama_synchronize(ctx)
        t1 = time.perf_counter()
        # The same steps as generate: the prompt gives token 1; new - 1 single-token evals give the rest. Greedy.
        for _ in range(new - 1):
            llm.eval([next_token()])
            llama_cpp.llama_synchronize(ctx)
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(ctx)
        own = {"t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval, "t_eval_ms": perf.t_eval_ms,
               "n_eval": perf.n_eval}
        return t1 - t0, (t2 - t1) / max(new - 1, 1), own

    run(prompt[: min(8, len(prompt))], min(8, n))  # warm-up
    wall_prefill, wall_decode, own = run(prompt, n)
    if own["n_p_eval"] != len(prompt) or own["n_eval"] != n - 1:
        raise RuntimeError(f"llama.cpp counted {own['n_p_eval']} prompt / {own['n_eval']} eval tokens, expected "
                           f"{len(prompt)} / {n - 1}")
    llm.close()
    return {"prefill_s": own["t_p_eval_ms"] / 1e3, "decode_s": own["t_eval_ms"] / 1e3 / max(own["n_eval"], 1),
            "wall_prefill_s": wall_prefill, "wall_decode_s": wall_decode, "load_s": load_s,
            "peak_rss_gib": _rss_gib(), "llama_perf": own}


def measure(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Runs one row in a fresh process; {'error': ...} instead of raising, so one broken row does not end the run."""
    # This file by path, as a module of its own: the child imports the plugin only where its row wants it.
    load = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('bench_llamacpp_child', "
            f"{os.path.abspath(__file__)!r}); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "sys.exit(m.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", load, "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"error": f"exit {proc.returncode}: {' '.join(tail)[:200]}"}


# ---------------------------------------------------------------------------------------------------------------
# The run


def machine() -> Dict[str, Any]:
    flags: List[str] = []
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    isa = [f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))]
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "llama_cpp_python", "gguf", "qwen2_moe_hf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "n/a"
    return {"cpu": name, "isa": isa, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions, "cores": os.cpu_count()}


def table(results: Dict[str, Any]) -> str:
    rows = results["rows"]
    bw = results["read_bytes_per_s"]

    def med(name: str, key: str) -> Optional[float]:
        vals = [s[key] for s in rows[name]["samples"] if key in s]
        return statistics.median(vals) if vals else None

    ref = {r: med(r, "decode_s") for r in (REF_F16, REF_Q4) if r in rows}
    ref_p = {r: med(r, "prefill_s") for r in (REF_F16, REF_Q4) if r in rows}
    prompt = results["settings"]["prompt"]
    cols = ["row", "decode tok/s", "ms/token", "prefill tok/s", "bytes/token MB", "floor tok/s", "of floor",
            "decode vs llama f16", "decode vs llama Q4_0", "prefill vs llama f16", "peak RSS GiB",
            "load: peak RSS growth / size on disk"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def load_ratio(row: Dict[str, Any]) -> str:  # our / built-in rows: what from_pretrained needed beyond the file
        growth = [s["load_peak_growth_bytes"] for s in row["samples"] if "load_peak_growth_bytes" in s]
        return f"{max(growth) / row['disk_bytes']:.2f}x" if growth and row.get("disk_bytes") else "-"

    def ratio(a: Optional[float], b: Optional[float]) -> str:  # speed ratio: >1 = this row is faster
        return f"{b / a:.2f}x" if a and b else "-"

    for name, row in rows.items():
        d, p = med(name, "decode_s"), med(name, "prefill_s")
        floor_tps = bw / row["bytes_per_token"]
        if d is None:
            errors = "; ".join(sorted({s["error"] for s in row["samples"] if "error" in s}))
            lines.append(f"| {name} | failed: {errors[:200]} |" + " |" * (len(cols) - 2))
            continue
        label = name + (f" [{row['impl']}]" if row.get("impl") else "") + \
            (" [no AMX/repack bufts]" if row.get("extra_bufts") is False else "")
        lines.append(f"| {label} | {1 / d:.2f} | {d * 1e3:.1f} | {prompt / p:.1f} | {row['bytes_per_token'] / 1e6:.0f} | "
                     f"{floor_tps:.1f} | {(1 / d) / floor_tps:.0%} | {ratio(d, ref.get(REF_F16))} | "
                     f"{ratio(d, ref.get(REF_Q4))} | {ratio(p, ref_p.get(REF_F16))} | "
                     f"{max(s.get('peak_rss_gib', 0) for s in row['samples']):.1f} | {load_ratio(row)} |")
    floor = results["floor_bf16_bytes"]
    lines.append(f"| memory floor (bf16/f16 weights) | {bw / floor:.2f} | {floor / bw * 1e3:.1f} | - | {floor / 1e6:.0f} "
                 f"| {bw / floor:.1f} | 100% | {ratio(floor / bw, ref.get(REF_F16))} | "
                 f"{ratio(floor / bw, ref.get(REF_Q4))} | - | - |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the real shape (default 4)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the real 151936)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens per generate (default 128)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, medians taken (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp n_threads (default 2)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                        help="only rows whose name contains one of these strings (e.g. 'ours' 'f16')")
    parser.add_argument("--workdir", help="keep the checkpoints / GGUFs here and reuse them (default: a temp dir, "
                                          "deleted at the end)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement (default 1800)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 layer, 8+8 tokens, 1 round: a smoke test")
    parser.add_argument("--json", metavar="FILE", help="write every sample and the settings to FILE")
    parser.add_argument("--prepare-only", action="store_true", help="make the files in --workdir, measure nothing")
    parser.add_argument("--discard", action="store_true",
                        help="delete the bf16 checkpoint / f16 GGUF once no selected row needs them (disk space: "
                             "the 24-layer run)")
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="llama.cpp rows without AMX / CPU_REPACK weight buffers (use_extra_bufts=false)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one measurement (see measure())
        spec = json.loads(args.child)
        result = (child_llama if spec["kind"] == "llama" else child_torch)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    q = args.quick
    shape = dict(QUICK if q else REAL)
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    layers = args.layers if args.layers is not None else (1 if q else 4)
    prompt = args.prompt if args.prompt is not None else (8 if q else 128)
    new = args.new_tokens if args.new_tokens is not None else (8 if q else 128)
    rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    for flag, value, low in (("--layers", layers, 1), ("--prompt", prompt, 1), ("--new-tokens", new, 2),
                             ("--rounds", rounds, 1), ("--threads", args.threads, 1), ("--vocab", shape["vocab_size"],
                                                                                       prompt + 1)):
        if value < low:
            parser.error(f"{flag}: expected >= {low}, got {value}")
    missing = []
    for module, pip in (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")):
        try:
            __import__(module)
        except ImportError:
            missing.append((module, pip))
    if missing:  # all of them in one message
        parser.error(f"needs the {' and '.join(m for m, _ in missing)} module{'s' * (len(missing) > 1)}: pip install "
                     f"{' '.join(p for _, p in missing)} (or pip install qwen2_moe_hf[llamacpp])")
    if args.prepare_only and not args.workdir:
        parser.error("--prepare-only needs --workdir (a temp dir would be deleted at once)")
    rows = [r for r in ROWS if not args.rows or any(s in r[0] for s in args.rows)]
    if not rows:
        parser.error(f"--rows {args.rows}: matches none of {[r[0] for r in ROWS]}")

    log = sys.stderr
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores; ISA: {' '.join(info['isa']) or '-'}; {info['versions']}", file=log)
    workdir = args.workdir or tempfile.mkdtemp(prefix="decode_vs_llamacpp_")
    try:
        print(f"preparing files in {workdir}", file=log, flush=True)
        paths = prepare(workdir, shape, layers, args.threads, log, wanted=[a for _, _, a in rows],
                        discard=args.discard)
        if args.prepare_only:
            print(f"files ready in {workdir}", file=log)
            return 0
        import random

        rng = random.Random(0)
        prompt_ids = [rng.randrange(shape["vocab_size"]) for _ in range(prompt)]
        sys.path.insert(0, ROOT)
        from qwen2_moe_hf.bench import ReadProbe  # a 512 MiB sum: bytes read per second

        results: Dict[str, Any] = {
            "machine": info,
            "settings": {"layers": layers, "shape": shape, "prompt": prompt, "new_tokens": new, "rounds": rounds,
                         "threads": args.threads, "quick": q},
            "rows": {name: {"kind": kind, "file": artifact, "samples": [],
                            **({"extra_bufts": False} if args.no_extra_bufts and kind == "llama" else {}),
                            "bytes_per_token": decode_bytes(paths[artifact], shape),
                            "disk_bytes": _folder_bytes(paths[artifact])}
                     for name, kind, artifact in rows},
            "floor_bf16_bytes": decode_bytes(paths["ckpt"], shape),
            "gguf_types": {artifact: gguf_types(paths[artifact]) for _, kind, artifact in rows if kind == "llama"},
            "made": _read_made(workdir),
            "read_samples": [],
        }
        probe = ReadProbe((64 if q else 512) << 20)
        for r in range(rounds):
            # Read bandwidth between rounds, in this otherwise idle parent: the floor of the same run.
            results["read_samples"] += [probe() for _ in range(3)]
            for name, kind, artifact in rows:
                row = results["rows"][name]
                spec = {"row": name, "kind": kind, "path": paths[artifact], "prompt_ids": prompt_ids,
                        "new_tokens": new, "threads": args.threads, "extra_bufts": row.get("extra_bufts", True),
                        "dtype": "auto" if name == GPTQ_FP16 else "bfloat16"}
                start = time.perf_counter()
                sample = measure(spec, args.timeout)
                if kind == "llama" and spec["extra_bufts"] and sample.get("error", "").startswith("exit -11"):
                    # Seen here: ggml's AMX mul_mat segfaults on some models (tiny shapes at least). Measure the
                    # row without the extra weight buffers (AMX, CPU_REPACK) rather than not at all, and say so.
                    print(f"  {name}: llama.cpp crashed (SIGSEGV) with AMX/repack buffers; retrying without them",
                          file=log, flush=True)
                    row["extra_bufts"] = spec["extra_bufts"] = False
                    row["note"] = "use_extra_bufts=false (crashed with AMX/CPU_REPACK buffers on)"
                    sample = measure(spec, args.timeout)
                results["rows"][name]["samples"].append(sample)
                if sample.get("impl"):
                    results["rows"][name]["impl"] = sample["impl"]
                what = sample.get("error") or (f"decode {sample['decode_s'] * 1e3:.1f} ms/token, prefill "
                                               f"{sample['prefill_s']:.2f} s, RSS {sample['peak_rss_gib']:.1f} GiB")
                print(f"  round {r + 1}/{rounds} {name}: {what} ({time.perf_counter() - start:.0f} s)", file=log,
                      flush=True)
        del probe
        results["read_bytes_per_s"] = statistics.median(results["read_samples"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    s = results["settings"]
    print(f"\n## Decode, batch 1, greedy: {layers} layers of Qwen1.5-MoE-A2.7B's shape (hidden {shape['hidden_size']}, "
          f"{shape['num_experts']} experts of {shape['moe_intermediate_size']}, top-{shape['num_experts_per_tok']}, "
          f"shared {shape['shared_expert_intermediate_size']}), vocabulary {shape['vocab_size']}, random weights; "
          f"{s['prompt']}-token prompt, {s['new_tokens']} new tokens; {s['threads']} threads; medians of {rounds} "
          f"interleaved rounds, one process per measurement.")
    print(f"{info['date']} | {info['cpu']} | ISA: {' '.join(info['isa'])} | "
          + " | ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"Read bandwidth (median, same run): {results['read_bytes_per_s'] / 1e9:.1f} GB/s. Floor = bytes a decode "
          f"step reads (each row's own file) / that bandwidth. Ratios: speed of the row / speed of the reference "
          f"(>1 = faster). llama.cpp rows: llama_perf_context timings; ours/built-in: generate with a logits clock.\n")
    print(table(results), flush=True)
    for artifact, types in results["gguf_types"].items():
        print(f"\n{artifact}: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())), end="")
    print()
    made = results.get("made")
    if made:
        print("\nFiles (each made in its own process): " + "; ".join(
            f"{name} {m['disk_bytes'] / 1e9:.2f} GB on disk, made in {m['seconds']:.0f} s with peak RSS "
            f"{m['peak_rss_bytes'] / 2**30:.2f} GiB" for name, m in made.items()))
    for name, row in results["rows"].items():
        if row.get("note"):
            print(f"{name}: {row['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
