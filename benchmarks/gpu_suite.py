"""Everything GPU-side in one prepared command (one H200, under 10 minutes):

    python benchmarks/gpu_suite.py [--tokens 1 16 64 256 1024 4096] [--decode-layers 24] [--budget-s 540]
                                   [--json FILE] [--dry-run] [--inject-fault]

1. Parity of every GPU backend registered (qwen2_moe_hf.moe.env_report) against the torch reference backend:
   a) one MoE block at the real Qwen1.5-MoE-A2.7B shape in bf16, fp16 and with GPTQ-Int4 experts (bf16
      activations), routed and shared experts, against the torch backend on the same (rounded) weights in fp32;
      per-row relative error (max |diff| / max |ref| per token) within PARITY_TOL of the dtype;
   b) tiny hub-layout checkpoints (sharded safetensors, per-expert keys; full precision and GPTQ made by
      qwen2_moe_hf.gptq.quantize_checkpoint) in a temp dir, loaded with from_pretrained(..., moe_backend=b,
      device_map=device): logits (per-row relative error vs the torch backend's) and greedy tokens (each token
      the backend picks must be a top choice of the torch backend's logits on that same sequence, within the
      tolerance: exact ties may flip, nothing else).
   All failures are collected; the speed phases still run; the exit code is 1 if any parity check failed.
2. Speed: one block at the real shape, bf16 and int4, for each --tokens count: ours per backend, transformers'
   built-in block (grouped_mm / batched_mm, same weights) and the floor = max(weights read once / measured copy
   bandwidth, FLOPs / measured matmul rate).
3. End-to-end greedy `generate` tokens/s (per-step, prefill left out) of a real-shape model with random weights and
   --decode-layers layers, bf16 and int4 (attention and experts GPTQ), batch 1 and 16, each backend; and the
   built-in bf16 model.

--budget-s (default 540) is checked before every step: a step whose estimate would not fit is skipped and the
output says so. At the end: one markdown block (date, GPU, versions, commit) holding every table, to paste into
docs/benchmarks.md; --json FILE writes the same numbers.

--dry-run runs the whole pipeline on CPU at tiny shapes (the backends that run on CPU; triton only when
TRITON_INTERPRET=1, in fp32 / fp16, as its interpreter reads bf16 wrongly). It measures nothing real; CI runs it
(modeling_tests/test_gpu_suite.py). --inject-fault is a test hook: it registers a deliberately wrong backend,
"faulty" (the reference's output x 1.05), so that the parity phase must fail and exit 1 naming it.

    python benchmarks/gpu_suite.py --tune triton_configs.json

only re-tunes the Triton kernels' tile table on this GPU (qwen2_moe_hf/kernels/triton_moe.py `tune`) and writes it
as JSON, which the launchers read when env QWEN2_MOE_HF_TRITON_CONFIGS names it.
"""

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             num_hidden_layers=1, vocab_size=151936)
DRY_SHAPE = dict(hidden_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                 shared_expert_intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=1, vocab_size=512)
# The tiny hub-layout checkpoints of the parity phase (real and dry run alike).
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=128, max_position_embeddings=256, pad_token_id=0)
TINY_GROUP = 32
# Per-row relative error allowed against the torch reference (fp32 on the same rounded weights for blocks; the torch
# backend in the same dtype for checkpoints): about 4 ulps of the output dtype near the row's largest value.
PARITY_TOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 3e-2, "int4": 3e-2}
CHECKPOINT_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Rough seconds per step on an H200 (dry run: / 20), for the budget; a step is skipped when it would not fit.
ESTIMATE = {"parity_block": 8, "parity_checkpoint": 6, "speed_tokens": 6, "generate_build": 40, "generate_run": 12,
            "builtin_build": 60}


# ---------------------------------------------------------------------------------------------------------------
# The run: device, budget, results


class Run:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.budget = args.budget_s
        self.start = time.perf_counter()
        self.repeats = dict(repeats=2, warmup=1) if self.dry else dict(repeats=20, warmup=3)
        self.results = {"parity_block": [], "parity_checkpoint": [], "speed": [], "generate": [], "skipped": [],
                        "failures": []}

    def elapsed(self):
        return time.perf_counter() - self.start

    def fits(self, step, what):
        estimate = ESTIMATE[step] / (20 if self.dry else 1)
        if self.elapsed() + estimate > self.budget:
            note = (f"{what}: skipped (budget: {self.elapsed():.0f} s of {self.budget:.0f} s used, "
                    f"needs ~{estimate:.0f} s)")
            print(note, flush=True)
            self.results["skipped"].append(note)
            return False
        return True

    def fail(self, text):
        print(f"PARITY FAILURE: {text}", flush=True)
        self.results["failures"].append(text)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, repeats=10, warmup=2):
        """Median seconds of fn() (CUDA events on the GPU)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def row_error(actual, expected):
    """Largest per-row relative error: max |a - e| / max |e| within each row (last dim), max over rows."""
    a = actual.float().reshape(-1, actual.shape[-1])
    e = expected.float().reshape(-1, expected.shape[-1])
    err = (a - e).abs().amax(-1) / e.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return err.max().item()


# ---------------------------------------------------------------------------------------------------------------
# Backends


def faulty_backend():
    """--inject-fault (test hook): a backend that computes the reference's output x 1.05, on any device."""
    from qwen2_moe_hf.moe import Backend
    from qwen2_moe_hf.moe.backends.registry import backend

    ref = backend("torch").experts
    return Backend("faulty", lambda x, ids, w, weights: ref(x, ids, w, weights) * 1.05, lambda *a: None,
                   lambda: (True, ""), priority=1000)


def interpreted_triton():
    """The triton backend with its device check lifted, for the dry run under TRITON_INTERPRET=1: the same kernels
    (qwen2_moe_hf/kernels/triton_moe.py), run by Triton's interpreter on CPU tensors."""
    from qwen2_moe_hf.moe.backends.registry import backend

    real = backend("triton")

    def supports(weights, device, dtype):  # the real one's checks (backends/triton.py), cpu in place of cuda
        if device.type != "cpu":
            return f"inputs on {device}, not cpu (interpreted)"
        if dtype not in (torch.float16, torch.float32):
            return f"dtype {dtype} under TRITON_INTERPRET (the interpreter reads bf16 wrongly)"
        if weights.kind is None:
            return weights.reason
        if weights.kind == "dense" and weights.dtype != dtype:
            return f"expert weights in {weights.dtype}, inputs in {dtype}"
        tensors = weights.projection_tensors()
        if not all(t.is_contiguous() for t in tensors):
            return "expert weights are not contiguous"
        if any(t.data_ptr() % 16 for t in tensors):
            return "expert weights are not 16-byte aligned (views at odd offsets)"
        return None

    return dataclasses.replace(real, supports=supports, available=lambda: (True, ""))


def gpu_backends(run, inject_fault):
    """{name: None (runs) or why it is skipped}: the backends under test (the torch reference is not one)."""
    from qwen2_moe_hf.moe import env_report, register_backend

    backends = {}
    for name, state in env_report().items():
        if name == "torch":
            continue
        if run.dry:
            if name == "triton":
                if os.environ.get("TRITON_INTERPRET") == "1":
                    register_backend(interpreted_triton())
                    backends[name] = None
                else:
                    backends[name] = "needs a GPU, or TRITON_INTERPRET=1 on the dry run"
                continue
        elif name == "cpu":
            continue
        backends[name] = None if state == "available" else state
    if inject_fault:
        register_backend(faulty_backend())
        backends["faulty"] = None
    return backends


def unsupported(name, block, device, dtype):
    """Why backend `name` declines this MoE block (e.g. triton: bf16 under the interpreter), or None: a layer it declines is
    "n/a" in the tables, not a parity failure (named explicitly, it would raise)."""
    from qwen2_moe_hf.moe.backends.registry import backend

    return backend(name).supports(block.experts.prepared_weights(block.shared_expert), device, dtype)


def first_moe_block(model):
    from qwen2_moe_hf import Qwen2MoeSparseMoeBlock

    return next(m for m in model.modules() if isinstance(m, Qwen2MoeSparseMoeBlock))


def parity_dtypes(run, backend):
    """Block-parity dtypes: ("bf16", "fp16", "int4") on the GPU; on the dry run the interpreter's fp32 / fp16."""
    if run.dry and backend == "triton":
        return ["fp32", "fp16", "int4"]
    if run.dry:
        return ["fp32", "bf16", "fp16", "int4"]
    return ["bf16", "fp16", "int4"]


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: parity


def parity_blocks(run, backends, shape, tokens_list):
    from qwen2_moe_hf import bench

    torch.manual_seed(0)
    with torch.device(run.device):
        base = bench.new_block(shape, torch.float32)
    int4_act = {}
    for name, skip in backends.items():
        if skip:
            continue
        for kind in parity_dtypes(run, name):
            what = f"block parity {name} {kind}"
            if not run.fits("parity_block", what):
                continue
            # int4 activations: bf16, except under the interpreter (fp16).
            act = DTYPES.get(kind) or (torch.float16 if run.dry and name == "triton" else torch.bfloat16)
            key = (kind, act)
            if key not in int4_act:
                block = copy.deepcopy(base).to(act)  # Module.to is in place: base stays fp32
                block = (bench.int4_block(block).to(act) if kind == "int4" else block).eval()
                ref = copy.deepcopy(block).float().eval()
                ref.config.moe_backend = "torch"
                int4_act[key] = (block, ref)
            block, ref = int4_act[key]
            tol = PARITY_TOL[kind]
            why = unsupported(name, block, run.device, act)
            if why:
                run.results["parity_block"].append(dict(backend=name, dtype=kind, tokens="-", err=None, tol=tol,
                                                        ok=True, na=why))
                print(f"{what}: n/a ({why})", flush=True)
                continue
            for tokens in tokens_list:
                x = torch.randn(1, tokens, shape["hidden_size"], device=run.device).to(act)
                try:
                    with torch.no_grad():
                        block.config.moe_backend = name
                        got = block(x)
                        got = got[0] if isinstance(got, tuple) else got
                        want = ref(x.float())
                        want = want[0] if isinstance(want, tuple) else want
                    err = row_error(got, want)
                    ok = err <= tol
                    row = dict(backend=name, dtype=kind, tokens=tokens, err=err, tol=tol, ok=ok)
                except Exception as exc:  # a backend that raises fails its parity
                    row = dict(backend=name, dtype=kind, tokens=tokens, err=None, tol=tol, ok=False,
                               error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                finally:
                    block.config.moe_backend = None
                run.results["parity_block"].append(row)
                print(f"{what} {tokens} tokens: err {row['err']} tol {tol} {'ok' if row['ok'] else 'FAIL'}"
                      + (f" ({row['error']})" if "error" in row else ""), flush=True)
                if not row["ok"]:
                    run.fail(f"{name} block {kind} {tokens} tokens: "
                             + (row.get("error") or f"error {row['err']:.2e} > {tol:.0e}"))
    return run


def make_checkpoints(folder):
    """A tiny full-precision hub-layout checkpoint and its GPTQ-Int4 one; returns {kind: path}."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from qwen2_moe_hf.gptq.quantize import quantize_checkpoint

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a decisive router (std 1), norms near 1, layers scaled by fan-in
        for name, p in sorted(model.named_parameters()):
            if name.endswith("mlp.gate.weight") or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    full = os.path.join(folder, "tiny")
    model.save_pretrained(full, max_shard_size="200KB", safe_serialization=True)
    gptq = quantize_checkpoint(full, os.path.join(folder, "tiny-gptq"), group_size=TINY_GROUP, progress=False)
    return {"full": full, "gptq": gptq}


def greedy_ok(ref_model, seq, prompt_len, tol):
    """Each generated token of `seq` is a top choice of ref_model's logits at its step (within tol of the row's
    largest |logit|): a backend may only flip exact-or-near ties. Returns (ok, first step that is not)."""
    with torch.no_grad():
        logits = ref_model(seq).logits.float()[:, prompt_len - 1:-1]
    chosen = logits.gather(-1, seq[:, prompt_len:, None])[..., 0]
    gap = (logits.amax(-1) - chosen) / logits.abs().amax(-1)
    bad = (gap > tol).nonzero()
    return bad.numel() == 0, (None if bad.numel() == 0 else int(bad[0, 1]))


def parity_checkpoints(run, backends, new_tokens=8):
    from qwen2_moe_hf import Qwen2MoeForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        if not run.fits("parity_checkpoint", "checkpoint parity"):
            return
        paths = make_checkpoints(folder)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, TINY["vocab_size"], (2, 12), generator=gen).to(run.device)
        for kind, path in paths.items():
            for name, skip in backends.items():
                if skip:
                    continue
                # full precision in bf16 (dry run: fp32, and fp16 for the interpreted triton); GPTQ in fp16.
                if kind == "gptq":
                    dkey = "fp16"
                else:
                    dkey = "fp32" if run.dry else "bf16"
                what = f"checkpoint parity {name} {kind} {dkey}"
                if not run.fits("parity_checkpoint", what):
                    continue
                tol = CHECKPOINT_TOL[dkey]
                row = dict(backend=name, checkpoint=kind, dtype=dkey, tol=tol)
                try:
                    models = {b: Qwen2MoeForCausalLM.from_pretrained(path, moe_backend=b, device_map=str(run.device),
                                                                     dtype=DTYPES[dkey]).eval()
                              for b in ("torch", name)}
                    why = unsupported(name, first_moe_block(models[name]), run.device, DTYPES[dkey])
                    if why:
                        row.update(ok=True, err=None, na=why)
                        run.results["parity_checkpoint"].append(row)
                        print(f"{what}: n/a ({why})", flush=True)
                        continue
                    if run.dry:  # on CPU the weights are views of the mmap'd shards, at any offset (on the GPU,
                        for m in models.values():  # device_map copies them): aligned copies, as the kernels need
                            with torch.no_grad():
                                for t in list(m.parameters()) + list(m.buffers()):
                                    t.data = t.data.clone()
                    with torch.no_grad():
                        want = models["torch"](ids).logits
                        got = models[name](ids).logits
                        seqs = {b: m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=0, eos_token_id=None)
                                for b, m in models.items()}
                    row["err"] = row_error(got, want)
                    row["tokens_equal"] = int((seqs[name] == seqs["torch"]).all(0)[ids.shape[1]:].sum())
                    row["tokens"] = new_tokens
                    greedy, step = greedy_ok(models["torch"], seqs[name], ids.shape[1], tol)
                    row["greedy_ok"] = greedy
                    row["ok"] = row["err"] <= tol and greedy
                    if not row["ok"]:
                        why = f"logits error {row['err']:.2e} > {tol:.0e}" if row["err"] > tol else \
                            f"greedy token at step {step} is not a top choice of the torch backend's logits"
                        run.fail(f"{name} checkpoint {kind} {dkey}: {why}")
                except Exception as exc:
                    row.update(ok=False, err=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    run.fail(f"{name} checkpoint {kind} {dkey}: {row['error']}")
                    traceback.print_exc()
                run.results["parity_checkpoint"].append(row)
                print(f"{what}: {row}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: block speed


def timed_backends(run, backends):
    """The backends of the speed phases: those tested, less the faulty test hook and, on the dry run, the
    interpreted triton (parity only: the interpreter takes seconds per call and measures nothing)."""
    return [n for n, skip in backends.items() if not skip and n != "faulty" and not (run.dry and n == "triton")]


def probes(run):
    """(copy bandwidth bytes/s, read + write; matmul FLOP/s in the speed dtype)."""
    n = (64 << 20) if run.dry else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=run.device).fill_(1)
    b = torch.empty_like(a)
    bw = 2 * n / run.time(lambda: b.copy_(a), repeats=5)
    m = 512 if run.dry else 8192
    dtype = torch.float32 if run.dry else torch.bfloat16
    x = torch.randn(m, m, dtype=dtype, device=run.device)
    y = torch.randn(m, m, dtype=dtype, device=run.device)
    rate = 2 * m ** 3 / run.time(lambda: x @ y, repeats=5)
    return bw, rate


def speed_blocks(run, backends, shape, tokens_list, bw, rate):
    from qwen2_moe_hf import bench

    names = timed_backends(run, backends)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(run.device):
        ours = bench.new_block(shape, dtype)
    int4 = bench.int4_block(ours).eval()
    have_builtin, why_not = bench.builtin_available()
    builtin = builtin_cfg = None
    if have_builtin:
        builtin, builtin_cfg = bench.builtin_block(ours, dtype)
        builtin = builtin.to(run.device).eval()
    for tokens in tokens_list:
        if not run.fits("speed_tokens", f"block speed {tokens} tokens"):
            continue
        x = torch.randn(1, tokens, shape["hidden_size"], dtype=dtype, device=run.device)
        weights, flops, hit = bench.floor_work(ours, x)
        weights = weights * 2 // x.element_size()  # the floor is stated for 2-byte weights, as on the GPU
        int4_weights = bench.int4_bytes(ours.config, hit, bench.INT4.group_size)
        row = dict(tokens=tokens, experts_hit=hit, floor_s=max(weights / bw, flops / rate),
                   int4_floor_s=max(int4_weights / bw, flops / rate), ours={}, ours_int4={}, builtin={})
        with torch.no_grad():
            for name in names:
                for kind, block, key in (("bf16", ours, "ours"), ("int4", int4, "ours_int4")):
                    block.config.moe_backend = name
                    try:
                        row[key][name] = run.time(lambda: block(x), **run.repeats)
                    except Exception as exc:
                        row[key][name] = None
                        print(f"speed {name} {kind} {tokens} tokens failed: {exc}", flush=True)
                    finally:
                        block.config.moe_backend = None
            if builtin is not None:
                for impl in ("grouped_mm", "batched_mm"):
                    builtin_cfg._experts_implementation = impl
                    # batched_mm gathers every selected expert's weights per token (283 GB at 4096 tokens)
                    need = tokens * shape["num_experts_per_tok"] * 3 * shape["hidden_size"] * \
                        shape["moe_intermediate_size"] * x.element_size()
                    free = torch.cuda.mem_get_info()[0] if run.device.type == "cuda" else bench.available_memory()
                    if impl == "batched_mm" and need > free // 2:
                        row["builtin"][impl] = None
                        print(f"builtin[{impl}] {tokens} tokens: left out (would gather {need / 2**30:.0f} GiB)")
                        continue
                    try:
                        row["builtin"][impl] = run.time(lambda: builtin(x), **run.repeats)
                    except Exception as exc:  # an implementation may not support this device / dtype
                        row["builtin"][impl] = None
                        print(f"builtin[{impl}] failed: {str(exc).splitlines()[0][:120]}", flush=True)
            else:
                row["builtin"]["n/a"] = None
                row["builtin_why_not"] = why_not
        run.results["speed"].append(row)
        print(f"speed {tokens} tokens: {row}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: end-to-end generate


def generate_rates(run, backends, shape, layers, new_tokens, bw):
    from qwen2_moe_hf import bench

    names = timed_backends(run, backends)
    dtype = torch.bfloat16
    if not run.fits("generate_build", f"generate: building a {layers}-layer model"):
        return
    vocab = shape["vocab_size"]
    torch.manual_seed(0)
    with torch.device(run.device):
        model = bench.new_model(shape, layers, vocab, dtype)
        models = {"bf16": model}
        if run.fits("generate_build", "generate: quantizing to int4"):
            models["int4"] = bench.int4_copy(model, attention=True).eval()
    prompt = 16

    def measure(label, backend, m):
        for batch in (1, 16):
            if not run.fits("generate_run", f"generate {label} batch {batch}"):
                continue
            ids = torch.randint(1, vocab, (batch, prompt), device=run.device)
            why = backend and unsupported(backend, first_moe_block(m), run.device, torch.bfloat16)
            if why:
                run.results["generate"].append(dict(model=label, batch=batch, step_s=None, tokens_per_s=None,
                                                    na=why))
                continue
            try:
                with torch.no_grad():
                    m.config.moe_backend = backend
                    bench.decode_step_time(m, ids, 3)  # warm-up
                    step = bench.decode_step_time(m, ids, new_tokens)
                row = dict(model=label, batch=batch, step_s=step, tokens_per_s=batch / step,
                           ceiling_tokens_per_s=bw / bench.decode_bytes(m) if batch == 1 else None)
            except Exception as exc:
                row = dict(model=label, batch=batch, step_s=None, tokens_per_s=None,
                           error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            finally:
                m.config.moe_backend = None
            run.results["generate"].append(row)
            print(f"generate {row}", flush=True)

    for kind, m in models.items():
        for name in names:
            measure(f"ours {kind} [{name}]", name, m)
    have_builtin, why_not = bench.builtin_available()
    if have_builtin and run.fits("builtin_build", "generate: the built-in model"):
        with torch.device(run.device):  # built where it runs (a real-shape model is 28 GB)
            builtin = bench.builtin_causal_lm(model).to(run.device)
        del models
        builtin.config._experts_implementation = "grouped_mm"
        measure("built-in bf16 (grouped_mm)", None, builtin)


# ---------------------------------------------------------------------------------------------------------------
# Output


def header(run):
    import transformers

    from qwen2_moe_hf.bench import git_commit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = "dry run on CPU" if run.dry else torch.cuda.get_device_name()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), gpu=gpu,
                torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                commit=git_commit(), triton_interpret=os.environ.get("TRITON_INTERPRET"))


def _us(s):
    return "-" if s is None else f"{s * 1e6:.0f}"


def report(run, backends, info):
    r = run.results
    out = [f"### gpu_suite {'--dry-run (tiny shapes on CPU: measures nothing real)' if run.dry else ''}".rstrip(), "",
           f"{info['date']} | {info['gpu']} | torch {info['torch']} | triton {info['triton']} | transformers "
           f"{info['transformers']} | commit {info['commit']} | {run.elapsed():.0f} s of budget {run.budget:.0f} s",
           "", "Backends: " + ", ".join(f"{n} ({'tested' if not s else 'skipped: ' + s})" for n, s in
                                         backends.items()),
           *(["", "Dry run: triton runs interpreted (TRITON_INTERPRET=1), in the parity phase only."]
             if run.dry and backends.get("triton") is None else []),
           "", f"#### Parity: MoE block vs the torch reference in fp32 (per-row relative error; tolerances "
           f"{', '.join(f'{k} {v:.0e}' for k, v in PARITY_TOL.items())})", "",
           "| backend | dtype | tokens | error | tolerance | |", "|---|---|---|---|---|---|"]
    for row in r["parity_block"]:
        err = f"n/a ({row['na']})" if row.get("na") else row.get("error") or f"{row['err']:.1e}"
        out.append(f"| {row['backend']} | {row['dtype']} | {row['tokens']} | {err} | {row['tol']:.0e} | "
                   f"{'ok' if row['ok'] else 'FAIL'} |")
    out += ["", "#### Parity: tiny hub-layout checkpoints through from_pretrained vs the torch backend (logits: "
            "per-row relative error; greedy: each token a top choice of the torch backend's logits)", "",
            "| backend | checkpoint | dtype | logits error | tolerance | greedy tokens equal | |",
            "|---|---|---|---|---|---|---|"]
    for row in r["parity_checkpoint"]:
        err = f"n/a ({row['na']})" if row.get("na") else row.get("error") or f"{row['err']:.1e}"
        equal = f"{row['tokens_equal']}/{row['tokens']}" if "tokens_equal" in row else "-"
        out.append(f"| {row['backend']} | {row['checkpoint']} | {row['dtype']} | {err} | {row['tol']:.0e} | "
                   f"{equal} | {'ok' if row['ok'] else 'FAIL'} |")
    if r["speed"]:
        names = list(r["speed"][0]["ours"])
        impls = list(r["speed"][0]["builtin"])
        cols = (["tokens", "hit", "floor us"] + [f"ours [{n}] us" for n in names]
                + [f"built-in [{i}] us" for i in impls]
                + ["int4 floor us"] + [f"ours int4 [{n}] us" for n in names] + ["ours best / floor",
                                                                               "built-in best / ours best"])
        out += ["", f"#### MoE block speed: median us per call; floor = max(bytes / copy bandwidth "
                f"{r['bandwidth'] / 1e9:.0f} GB/s, FLOPs / matmul {r['matmul_rate'] / 1e12:.1f} TFLOP/s)", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in r["speed"]:
            ours = [t for t in row["ours"].values() if t]
            theirs = [t for t in row["builtin"].values() if t]
            best, tbest = (min(ours) if ours else None), (min(theirs) if theirs else None)
            cells = ([str(row["tokens"]), str(row["experts_hit"]), _us(row["floor_s"])]
                     + [_us(row["ours"][n]) for n in names] + [_us(row["builtin"][i]) for i in impls]
                     + [_us(row["int4_floor_s"])] + [_us(row["ours_int4"][n]) for n in names]
                     + [f"{best / row['floor_s']:.2f}" if best else "-",
                        f"{tbest / best:.2f}x" if best and tbest else "-"])
            out.append("| " + " | ".join(cells) + " |")
    if r["generate"]:
        out += ["", "#### End-to-end greedy generate (per decode step, prefill left out)", "",
                "| model | batch | ms/step | tokens/s | batch-1 ceiling tokens/s |", "|---|---|---|---|---|"]
        for row in r["generate"]:
            if row.get("error") or row.get("na"):
                why = f"n/a ({row['na']})" if row.get("na") else f"failed: {row['error']}"
                out.append(f"| {row['model']} | {row['batch']} | {why} | | |")
                continue
            ceiling = f"{row['ceiling_tokens_per_s']:.0f}" if row.get("ceiling_tokens_per_s") else "-"
            out.append(f"| {row['model']} | {row['batch']} | {row['step_s'] * 1e3:.2f} | {row['tokens_per_s']:.1f} |"
                       f" {ceiling} |")
    if r["skipped"]:
        out += ["", "Skipped for the time budget:"] + [f"- {s}" for s in r["skipped"]]
    out += ["", ("Parity FAILED:\n" + "\n".join(f"- {f}" for f in r["failures"])) if r["failures"] else
            "Parity: all checks passed."]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="token counts of the block speed table (default 1 16 64 256 1024 4096; dry run 1 8)")
    parser.add_argument("--decode-layers", type=int, default=None,
                        help="layers of the real-shape generate model (default 24; dry run 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generate (default 32; dry run 4)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds; steps that would not fit are skipped and said so (default 540)")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole pipeline on CPU at tiny shapes (triton only with TRITON_INTERPRET=1)")
    parser.add_argument("--inject-fault", action="store_true",
                        help="test hook: register a wrong backend 'faulty' that parity must catch (exit 1)")
    parser.add_argument("--tune", metavar="JSON", help="only re-tune the Triton tile table on this GPU (kernels/"
                        "triton_moe.py tune), write it to JSON; use it with QWEN2_MOE_HF_TRITON_CONFIGS=JSON")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA GPU (or --dry-run)")
    if args.tune:
        from qwen2_moe_hf.kernels.triton_moe import tune

        print(torch.cuda.get_device_name(), "| torch", torch.__version__)
        table = tune(args.tune)
        print(f"wrote {args.tune}: {table}\nuse it: QWEN2_MOE_HF_TRITON_CONFIGS={args.tune}; then recompile the "
              f"report: python -m qwen2_moe_hf.kernels.triton_aot --all")
        return 0
    run = Run(args)
    if not run.dry:
        from qwen2_moe_hf.kernels.build import load_cuda_ops

        t = time.perf_counter()
        print("cuda ops:", load_cuda_ops(), f"({time.perf_counter() - t:.0f} s)", flush=True)
    shape = DRY_SHAPE if run.dry else SHAPE
    tokens = args.tokens or ([1, 8] if run.dry else [1, 16, 64, 256, 1024, 4096])
    layers = args.decode_layers or (1 if run.dry else 24)
    new_tokens = args.new_tokens or (4 if run.dry else 32)
    info = header(run)
    backends = gpu_backends(run, args.inject_fault)
    print("backends:", backends, flush=True)
    parity_blocks(run, backends, shape, [1, 8] if run.dry else [1, 64])
    parity_checkpoints(run, backends)
    bw, rate = probes(run)
    run.results.update(bandwidth=bw, matmul_rate=rate)
    speed_blocks(run, backends, shape, tokens, bw, rate)
    try:
        generate_rates(run, backends, shape, layers, new_tokens, bw)
    except Exception as exc:  # out of memory at the real shape, say: the tables so far still print
        traceback.print_exc()
        run.results["skipped"].append(f"generate: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    text = report(run, backends, info)
    print("\n" + text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, backends=backends, elapsed_s=run.elapsed(), **run.results), f, indent=1,
                      default=str)
        print(f"\nwrote {args.json}")
    return 1 if run.results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
