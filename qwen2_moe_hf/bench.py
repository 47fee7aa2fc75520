"""Measure this machine: the MoE block at the real Qwen1.5-MoE layer shape and end-to-end decode, bf16 and GPTQ-Int4.

    qwen2-moe-hf bench [--tokens 1 16 256] [--layers 2] [--vocab 32000] [--repeats 5] [--threads N]
                       [--quick] [--json FILE] [--plot FILE.png] [--no-progress]

1. One MoE layer (hidden 2048, 60 experts of 1408, top-4, shared expert 5632), random weights, at each --tokens:
   our backends in bf16 and with GPTQ-Int4 experts (group 128, sym, shared expert too), transformers 5.x's own
   Qwen2MoeSparseMoeBlock with the same weights (the best of its experts implementations; n/a before 5.x), and the
   memory floor: the bytes the block must read once / a read bandwidth measured in every round of the same run.
2. Greedy batch-1 `generate` on a model of that shape with --layers layers and a --vocab vocabulary: decode
   tokens/s of ours in bf16 and GPTQ-Int4 (attention and experts, like the released checkpoint) and of the built-in,
   against the ceiling of reading the active weights once per token at the same read bandwidth.

Variants run interleaved (round-robin) in one process and cells are medians: a shared machine's speed drifts within
minutes, so only numbers taken side by side compare. Every timed block call starts from caches of unrelated clean
data. The tables are markdown, for docs/benchmarks.md; the benchmarks/ scripts use the same helpers.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from . import __version__, compat
from .configuration_qwen2_moe import Qwen2MoeConfig
from .gptq.format import GPTQSpec
from .gptq.linear import use_blocked_layout
from .gptq.quantize import quantize_linears_
from .kernels.build import cpu_build, cpu_module, load_cpu_ops
from .loading.plan import default_dtype
from .modeling_qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeSparseMoeBlock
from .moe import env_report, route

# The real Qwen1.5-MoE-A2.7B layer (../shared/NOTES.md); vocab_size only matters for the decode model.
SHAPE: Dict[str, Any] = dict(hidden_size=2048, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                             shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                             num_hidden_layers=1, vocab_size=1024)
# --quick: small enough for a test on 2 cores, still multiples of the int4 group.
QUICK_SHAPE: Dict[str, Any] = dict(hidden_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                   shared_expert_intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                                   num_hidden_layers=1, vocab_size=512)
PROJ = ("gate_proj", "up_proj", "down_proj")
INT4 = GPTQSpec(bits=4, group_size=128, sym=True)  # as in the released GPTQ-Int4 checkpoint
BUILTIN_IMPLS = ("eager", "grouped_mm", "batched_mm")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PLOT_EXTRA = "pip install qwen2_moe_hf[plot]"
LLAMACPP_EXTRA = "pip install qwen2_moe_hf[llamacpp]"
DROP_FACTOR = 20  # a variant whose warm call is this many times the fastest one's is left out of the rounds
BUILTIN_KEEP = 1.5  # built-in implementations within this factor of the fastest one's warm call are all measured


class BenchError(ValueError):
    """A bad flag or an unusable environment, said before any measuring starts."""


# ---------------------------------------------------------------------------------------------------------------
# Probes and timing


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CopyProbe:
    """STREAM-style copy of 512 MiB: bytes read + bytes written per second (the larger, stricter convention)."""

    def __init__(self, nbytes: int = 512 << 20) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def __call__(self) -> float:
        return 2 * self.src.numel() / timed(lambda: self.dst.copy_(self.src))


class ReadProbe:
    """`tensor.sum()` over 512 MiB: bytes read per second. A block streaming its weights reads them about this
    fast (docs/CHANGELOG.md, measurement log), while copies speed up and slow down apart from reads on this kind of
    machine."""

    def __init__(self, nbytes: int = 512 << 20) -> None:
        self.buf = torch.ones(nbytes // 4)
        self.buf.sum()

    def __call__(self) -> float:
        return self.buf.numel() * 4 / timed(self.buf.sum)


class CleanCaches:
    """Reads 64 MiB (twice the last-level cache) so that every timed call starts alike: caches full of clean data
    it does not use. Without it the first variant after the probes paid for writing back the matmul probe's dirty
    output (~10 MB, ~0.7 ms at 1 token), a cost that belongs to neither the variant nor a decode step."""

    def __init__(self, nbytes: int = 64 << 20) -> None:
        self.buf = torch.ones(nbytes // 4)

    def __call__(self) -> None:
        self.buf.sum()


class MatmulProbe:
    """A large matmul (1024 x 2048 x 2816): FLOP per second."""

    def __init__(self, dtype: torch.dtype, m: int = 1024, k: int = 2048, n: int = 2816) -> None:
        self.a, self.b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        self.flops = 2 * m * k * n
        self.a @ self.b

    def __call__(self) -> float:
        return self.flops / timed(lambda: self.a @ self.b)


def available_memory() -> int:
    """MemAvailable in bytes (Linux); a large number elsewhere, so nothing is left out for lack of it."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 1 << 50


@dataclass
class Variant:
    """One thing to measure: `measure()` returns seconds; `setup()` runs untimed before it (e.g. picks a backend)."""

    name: str
    measure: Callable[[], float]
    setup: Optional[Callable[[], None]] = None
    column: str = ""  # the table column it competes for (several built-in implementations share one)

    def __post_init__(self) -> None:
        self.column = self.column or self.name


def interleave(variants: Sequence[Variant], repeats: int, clean: Optional[Callable[[], None]] = None,
               probes: Optional[Dict[str, Callable[[], float]]] = None,
               on_round: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Round-robin: each round runs every probe once, then every variant once (caches cleaned before each).
    Returns ({variant: seconds per round}, {probe: value per round}); take medians."""
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    probed: Dict[str, List[float]] = {name: [] for name in probes or {}}
    for _ in range(repeats):
        for name, probe in (probes or {}).items():
            probed[name].append(probe())
        for v in variants:
            if v.setup is not None:
                v.setup()
            if clean is not None:
                clean()
            times[v.name].append(v.measure())
        if on_round is not None:
            on_round()
    return times, probed


def warm_up(variants: Sequence[Variant], clean: Optional[Callable[[], None]] = None, drop_slow: bool = True
            ) -> Tuple[List[Variant], Dict[str, str]]:
    """Runs each variant twice (the first call builds ops and caches); leaves out, with the reason, those that fail,
    those hopelessly slower than the rest (> DROP_FACTOR x the fastest; with `drop_slow`), and the members of a
    shared column (the built-in's implementations) far from its fastest: each column is reported as its best."""
    warm: Dict[str, float] = {}
    dropped: Dict[str, str] = {}
    for v in variants:
        try:
            if v.setup is not None:
                v.setup()
            v.measure()
            if clean is not None:
                clean()
            warm[v.name] = v.measure()
        except RuntimeError as exc:  # e.g. an implementation that cannot run this shape or dtype here
            dropped[v.name] = f"failed: {str(exc).splitlines()[0][:120]}"
    if not warm:
        return [], dropped
    fastest = min(warm.values())
    best_in_column: Dict[str, float] = {}
    for v in variants:
        if v.name in warm:
            best_in_column[v.column] = min(best_in_column.get(v.column, float("inf")), warm[v.name])
    kept = []
    for v in variants:
        if v.name not in warm:
            continue
        if drop_slow and warm[v.name] > DROP_FACTOR * fastest:
            dropped[v.name] = f"{warm[v.name] / fastest:.0f}x slower than the fastest variant on its warm call"
        elif warm[v.name] > BUILTIN_KEEP * best_in_column[v.column]:
            dropped[v.name] = f"{warm[v.name] / best_in_column[v.column]:.1f}x slower than the best of its column"
        else:
            kept.append(v)
    return kept, dropped


# ---------------------------------------------------------------------------------------------------------------
# Models and the bytes they must read


def randomize_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Random weights, norms at one (normal(0, std) norms would shrink every activation to nothing)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, std)
    return module


def new_block(shape: Dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> Qwen2MoeSparseMoeBlock:
    with default_dtype(dtype):
        block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(**shape))
    return randomize_(block).eval()


def new_model(shape: Dict[str, Any], layers: int, vocab: int, dtype: torch.dtype = torch.bfloat16
              ) -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(**{**shape, "num_hidden_layers": layers, "vocab_size": vocab,
                               "intermediate_size": shape["shared_expert_intermediate_size"]})
    with default_dtype(dtype):
        model = Qwen2MoeForCausalLM(config)
    return randomize_(model).to(dtype).eval()


def quantized_names(module: nn.Module, attention: bool) -> List[str]:
    """The Linear layers the released GPTQ-Int4 checkpoint quantizes: routed and shared experts, and (with
    `attention`) q/k/v/o. The router and shared_expert_gate, embeddings and lm_head stay in full precision."""
    names = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_experts = leaf in PROJ and ("experts." in name or "shared_expert." in name)
        in_attention = attention and leaf in ("q_proj", "k_proj", "v_proj", "o_proj")
        if in_experts or in_attention:
            names.append(name)
    return names


def int4_copy(module: nn.Module, spec: GPTQSpec = INT4, attention: bool = True, blocked: bool = True) -> nn.Module:
    """A copy of `module` with GPTQ-Int4 (round to nearest) weights in place of its expert (and attention)
    Linears; the rest in bf16. blocked: qweights in the CPU kernels' layout, as a CPU load leaves them."""
    module = copy.deepcopy(module)
    quantize_linears_(module, quantized_names(module, attention), spec)
    module = module.to(torch.bfloat16)  # router and gates compute in bf16; the int4 buffers stay int32
    if blocked:
        use_blocked_layout(module)
    return module


def int4_block(bf16_block: Qwen2MoeSparseMoeBlock, spec: GPTQSpec = INT4) -> Qwen2MoeSparseMoeBlock:
    """The block with GPTQ-Int4 routed and shared experts (as in the released checkpoint)."""
    return int4_copy(bf16_block, spec, attention=False)


def floor_work(block: Qwen2MoeSparseMoeBlock, x: torch.Tensor) -> Tuple[int, int, int]:
    """(weight bytes read once, FLOPs, experts hit) of one forward of `block` on x (weights in x's dtype)."""
    config = block.config
    tokens = x.numel() // config.hidden_size
    with torch.no_grad():
        _, ids = route(block.gate(x.reshape(-1, config.hidden_size)), config.num_experts_per_tok,
                       config.norm_topk_prob)
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


def int4_bytes(config: Qwen2MoeConfig, hit: int, group: int) -> int:
    """Bytes of a block with int4 routed and shared experts (nibbles, 2-byte scales, 4-bit zeros) and a 2-byte
    router, `hit` experts read."""
    def linear(k: int, n: int) -> int:
        return k * n // 2 + (k // group) * n * 2 + (k // group) * n // 2

    h, i, s = config.hidden_size, config.moe_intermediate_size, config.shared_expert_intermediate_size
    return hit * (2 * linear(h, i) + linear(i, h)) + 2 * linear(h, s) + linear(s, h) + (config.num_experts + 1) * h * 2


def decode_bytes(model: nn.Module) -> int:
    """Bytes one batch-1 decode step must read: every weight once, but only top-k of the experts per layer and one
    row of the embedding (the KV cache of a short prompt is negligible)."""
    config = model.config
    total = 0.0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            nbytes *= config.num_experts_per_tok / config.num_experts
        elif "embed_tokens" in name:
            nbytes /= config.vocab_size
        total += nbytes
    return int(total)


def builtin_available() -> Tuple[bool, str]:
    """Whether transformers ships the Qwen2MoeSparseMoeBlock with fused 3-D experts that we compare against."""
    if not compat.HAS_BUILTIN_QWEN2_MOE:
        return False, f"transformers {compat.TRANSFORMERS_VERSION} has no qwen2_moe"
    if not compat.IS_V5:
        return False, f"transformers {compat.TRANSFORMERS_VERSION}: the comparison is with 5.x's fused experts"
    return True, ""


def _builtin_config(config: Qwen2MoeConfig, **overrides: Any) -> Any:
    from transformers.models.qwen2_moe import configuration_qwen2_moe as hf_config

    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
              "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps", "max_position_embeddings", "rope_theta")
    return hf_config.Qwen2MoeConfig(**{**{f: getattr(config, f) for f in fields}, **overrides})


def _copy_experts_(builtin_mlp: nn.Module, ours_mlp: nn.Module) -> None:
    """Our per-expert Linears into the built-in's fused [E, 2I, H] / [E, H, I] tensors."""
    for e, expert in enumerate(ours_mlp.experts):
        builtin_mlp.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
        builtin_mlp.experts.down_proj[e].copy_(expert.down_proj.weight)


def builtin_block(ours: Qwen2MoeSparseMoeBlock, dtype: torch.dtype) -> Tuple[nn.Module, Any]:
    """transformers' own Qwen2MoeSparseMoeBlock with our block's weights (experts fused as it stores them), and its
    config (set `_experts_implementation` on it to choose eager / grouped_mm / batched_mm)."""
    from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_model

    config = _builtin_config(ours.config)
    with default_dtype(dtype):
        block = hf_model.Qwen2MoeSparseMoeBlock(config)
    block = block.to(dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        _copy_experts_(block, ours)
        for name in PROJ:
            getattr(block.shared_expert, name).weight.copy_(getattr(ours.shared_expert, name).weight)
        block.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
    return block, config


def builtin_causal_lm(ours: Qwen2MoeForCausalLM) -> nn.Module:
    """transformers' own Qwen2MoeForCausalLM with our model's weights."""
    from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_model

    dtype = ours.lm_head.weight.dtype
    with default_dtype(dtype):
        model = hf_model.Qwen2MoeForCausalLM(_builtin_config(ours.config))
    model = model.to(dtype).eval()
    state = {k: v for k, v in ours.state_dict().items() if ".experts." not in k}
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Only the fused experts may be missing (copied below): anything else would run on random weights.
        missing = [k for k in missing if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        if missing or unexpected:
            raise RuntimeError(f"built-in model: missing {missing[:4]}, unexpected {unexpected[:4]}")
        for theirs, mine in zip(model.model.layers, ours.model.layers):
            _copy_experts_(theirs.mlp, mine.mlp)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The machine


def isa_flags() -> Dict[str, bool]:
    """The CPU features that decide which kernels run fast here (the flags lscpu shows, read from /proc/cpuinfo)."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {name: name in flags for name in ISA_FLAGS}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The short commit of the checkout the package runs from, when it runs from one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine_info() -> Dict[str, Any]:

    flags = isa_flags()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "qwen2_moe_hf": __version__, "commit": git_commit(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa": flags,
        "backends": env_report(), "cpu_ops": cpu_ops_paths(),
    }


def cpu_ops_paths() -> Optional[Dict[str, Any]]:
    """Which build of the CPU ops runs and which of its ISA-dependent paths are on (None without the ops)."""
    if not load_cpu_ops()[0]:
        return None
    module = cpu_module()
    return {"build": cpu_build()[0], "onednn_bf16_rows": module.native_bf16_rows(),
            "onednn_int4_rows": module.native_int4_rows(), "int4_vnni": module.int4_vnni()}


def header(info: Dict[str, Any]) -> str:
    have = " ".join(name for name, on in info["isa"].items() if on) or "-"
    lack = " ".join(name for name, on in info["isa"].items() if not on) or "-"
    commit = f" (commit {info['commit']})" if info["commit"] else ""
    return (f"{info['date']} | qwen2_moe_hf {info['qwen2_moe_hf']}{commit} | torch {info['torch']} | "
            f"transformers {info['transformers']}\n"
            f"CPU: {info['cpu']}, {info['threads']} threads | ISA: {have} (absent: {lack}) | "
            f"torch CPU capability {info['cpu_capability']}" + _ops_line(info.get("cpu_ops")))


def _ops_line(ops: Optional[Dict[str, Any]]) -> str:
    if not ops:
        return "\nCPU ops: not built (the torch path runs)"
    def rows(n: int) -> str:
        return f"from {n} rows" if n else "off"
    return (f"\nCPU ops: {ops['build']} | oneDNN bf16 GEMMs {rows(ops['onednn_bf16_rows'])} | oneDNN int4 GEMMs "
            f"{rows(ops['onednn_int4_rows'])} | int4 VNNI dot products {'on' if ops['int4_vnni'] else 'off'}")


# ---------------------------------------------------------------------------------------------------------------
# The two measurements


@dataclass
class Settings:
    shape: Dict[str, Any]
    tokens: List[int]
    layers: int
    vocab: int
    repeats: int
    prompt: int
    new_tokens: int
    read_bytes: int
    progress: bool = True
    quick: bool = False


def _median(samples: List[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _columns(variants: Sequence[Variant], times: Dict[str, List[float]]) -> Dict[str, Tuple[float, str]]:
    """{column: (best median among its variants, that variant's name)}."""
    best: Dict[str, Tuple[float, str]] = {}
    for v in variants:
        m = _median(times.get(v.name, []))
        if m == m and (v.column not in best or m < best[v.column][0]):
            best[v.column] = (m, v.name)
    return best


def measure_block(settings: Settings, ours: Qwen2MoeSparseMoeBlock, bar: Any) -> Dict[str, Any]:
    """Section 1: per token count, our backends bf16 and int4, the built-in, and the floors, interleaved."""
    config = ours.config
    bar.set_postfix_str("block: quantizing the experts to int4")
    int4 = int4_block(ours).eval()
    int4_config = int4.config  # deep-copied with the block: its own moe_backend switch
    bar.update(1)
    backends = [name for name, state in env_report().items() if state == "available"]
    have_builtin, why_not = builtin_available()
    builtin = builtin_config = None
    if have_builtin:
        bar.set_postfix_str("block: the built-in block")
        builtin, builtin_config = builtin_block(ours, torch.bfloat16)
    bar.update(1)
    probe = ReadProbe(settings.read_bytes)
    clean = CleanCaches()
    rows = []
    for tokens in settings.tokens:
        bar.set_postfix_str(f"block: {tokens} tokens")
        x = torch.randn(1, tokens, config.hidden_size, dtype=torch.bfloat16)
        weights, flops, hit = floor_work(ours, x)
        int4_weight_bytes = int4_bytes(config, hit, INT4.group_size)
        variants = []
        for kind, block, cfg in (("bf16", ours, config), ("int4", int4, int4_config)):
            for b in backends:
                variants.append(Variant(f"ours {kind} [{b}]", lambda block=block: timed(lambda: block(x)),
                                        setup=lambda cfg=cfg, b=b: setattr(cfg, "moe_backend", b)))
        dropped: Dict[str, str] = {}
        if builtin is not None:
            for impl in BUILTIN_IMPLS:
                if impl == "batched_mm":  # gathers every selected expert's weights per token
                    need = tokens * config.num_experts_per_tok * 3 * config.hidden_size * \
                        config.moe_intermediate_size * x.element_size()
                    if need > available_memory() // 2:
                        dropped[f"built-in bf16 [{impl}]"] = f"would gather {need / 2**30:.0f} GiB of weights"
                        continue
                variants.append(Variant(f"built-in bf16 [{impl}]", lambda: timed(lambda: builtin(x)),
                                        setup=lambda impl=impl: setattr(builtin_config, "_experts_implementation",
                                                                        impl),
                                        column="built-in bf16"))
        with torch.no_grad():
            # --quick keeps every variant: at tiny shapes the warm calls say more about noise than about speed.
            kept, more = warm_up(variants, clean, drop_slow=not settings.quick)
            dropped.update(more)
            bar.update(1)
            times, probed = interleave(kept, settings.repeats, clean, {"read": probe}, on_round=lambda: bar.update(1))
        read_bw = _median(probed["read"])
        rows.append({
            "tokens": tokens, "experts_hit": hit, "read_bytes_per_s": read_bw, "read_samples": probed["read"],
            "bf16_bytes": weights, "int4_bytes": int4_weight_bytes, "flops": flops,
            "bf16_floor_s": weights / read_bw, "int4_floor_s": int4_weight_bytes / read_bw,
            "variants": {name: {"median_s": _median(t), "samples_s": t} for name, t in times.items()},
            "columns": {c: {"median_s": m, "variant": n} for c, (m, n) in _columns(kept, times).items()},
            "dropped": dropped,
        })
    config.moe_backend = None
    return {"shape": {k: v for k, v in settings.shape.items() if k not in ("num_hidden_layers", "vocab_size")},
            "group_size": INT4.group_size, "backends": backends, "builtin": have_builtin or why_not, "rows": rows}


def decode_step_time(model: nn.Module, ids: torch.Tensor, n: int) -> float:
    """Seconds per decoded token of one greedy `generate` of n new tokens: the time between the first and the last
    step's logits, over n - 1 steps (the prompt's prefill is left out; each step is a whole step of generate)."""

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: List[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    # min_new_tokens: random weights may pick the end-of-text token early; every run must decode n tokens.
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                   logits_processor=LogitsProcessorList([clock]))
    if len(clock.times) != n:
        raise RuntimeError(f"generate made {len(clock.times)} steps, not {n}")
    return (clock.times[-1] - clock.times[0]) / (n - 1)


def measure_decode(settings: Settings, model: Qwen2MoeForCausalLM, bar: Any) -> Dict[str, Any]:
    """Section 2: greedy batch-1 decode, seconds per token of each model (decode_step_time), interleaved."""
    n = settings.new_tokens
    bar.set_postfix_str("decode: quantizing to int4")
    int4 = int4_copy(model, attention=True).eval()
    bar.update(1)
    models = {"ours bf16": model, "ours int4": int4}
    have_builtin, why_not = builtin_available()
    builtin = None
    check: Dict[str, float] = {}
    ids = torch.randint(0, settings.vocab, (1, settings.prompt))
    if have_builtin:
        bar.set_postfix_str("decode: the built-in model")
        builtin = builtin_causal_lm(model)
        with torch.no_grad():  # the same weights must give the same logits, or the comparison means nothing
            want = model(ids).logits.float()
            got = builtin(ids).logits.float()
        check["builtin_logits_rel_err"] = ((got - want).norm() / want.norm()).item()
    bar.update(1)

    def step(m: nn.Module) -> float:
        return decode_step_time(m, ids, n)

    variants = [Variant(name, lambda m=m: step(m)) for name, m in models.items()]
    if builtin is not None:
        for impl in BUILTIN_IMPLS:
            variants.append(Variant(f"built-in bf16 [{impl}]", lambda: step(builtin), column="built-in bf16",
                                    setup=lambda impl=impl: setattr(builtin.config, "_experts_implementation", impl)))
    probe = ReadProbe(settings.read_bytes)
    bar.set_postfix_str("decode")
    with torch.no_grad():
        kept, dropped = warm_up(variants, drop_slow=False)  # whole models: none is hopeless, all are reported
        bar.update(1)
        times, probed = interleave(kept, settings.repeats, None, {"read": probe}, on_round=lambda: bar.update(1))
    read_bw = _median(probed["read"])
    per_token = {"ours bf16": decode_bytes(model), "ours int4": decode_bytes(int4)}
    per_token["built-in bf16"] = per_token["ours bf16"]  # the same weights
    columns = {c: {"median_s": m, "variant": name, "tokens_per_s": 1 / m, "bytes_per_token": per_token[c],
                   "ceiling_tokens_per_s": read_bw / per_token[c]}
               for c, (m, name) in _columns(kept, times).items()}
    return {"layers": settings.layers, "vocab": settings.vocab, "prompt": settings.prompt, "new_tokens": n,
            "read_bytes_per_s": read_bw, "read_samples": probed["read"], "builtin": have_builtin or why_not,
            "variants": {name: {"median_s": _median(t), "samples_s": t} for name, t in times.items()},
            "columns": columns, "dropped": dropped, **check}


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot


def _ms(seconds: Optional[float]) -> str:
    # 3 significant digits below 10 ms: a --quick shape's floor is microseconds, not "0.00"
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1e3:.1f}" if seconds >= 0.01 \
        else f"{seconds * 1e3:.3g}"


def _impl(variant: str) -> str:
    return variant[variant.index("[") + 1:-1] if "[" in variant else variant


def block_table(block: Dict[str, Any]) -> str:
    backends = block["backends"]
    has_builtin = block["builtin"] is True
    cols = (["tokens", "experts hit", "read GB/s", "bf16 floor ms"] + [f"ours bf16 [{b}] ms" for b in backends]
            + ["built-in bf16 ms", "int4 floor ms"] + [f"ours int4 [{b}] ms" for b in backends]
            + ["ours bf16 / floor", "ours int4 / floor", "built-in / ours bf16", "ours bf16 / ours int4"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes = []
    for row in block["rows"]:
        col = row["columns"]

        def med(name: str) -> Optional[float]:
            return col[name]["median_s"] if name in col else None

        bf16 = [med(f"ours bf16 [{b}]") for b in backends]
        int4 = [med(f"ours int4 [{b}]") for b in backends]
        best_bf16 = min((t for t in bf16 if t is not None), default=None)
        best_int4 = min((t for t in int4 if t is not None), default=None)
        if has_builtin and "built-in bf16" in col:
            builtin = med("built-in bf16")
            builtin_cell = f"{_ms(builtin)} ({_impl(col['built-in bf16']['variant'])})"
        else:
            builtin, builtin_cell = None, "n/a" if not has_builtin else "-"

        def ratio(a: Optional[float], b: Optional[float]) -> str:
            return f"{a / b:.2f}x" if a is not None and b else "n/a"

        cells = ([str(row["tokens"]), str(row["experts_hit"]), f"{row['read_bytes_per_s'] / 1e9:.1f}",
                  _ms(row["bf16_floor_s"])] + [_ms(t) for t in bf16] + [builtin_cell, _ms(row["int4_floor_s"])]
                 + [_ms(t) for t in int4]
                 + [ratio(best_bf16, row["bf16_floor_s"]), ratio(best_int4, row["int4_floor_s"]),
                    ratio(builtin, best_bf16), ratio(best_bf16, best_int4)])
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"{row['tokens']} tokens: {name} left out ({why})" for name, why in row["dropped"].items()]
    if not has_builtin:
        notes.append(f"built-in: n/a ({block['builtin']})")
    return "\n".join(lines + ([""] + notes if notes else []))


def decode_table(decode: Dict[str, Any]) -> str:
    lines = ["| model | ms/token | tokens/s | ceiling tokens/s | of ceiling | vs built-in |", "|---" * 6 + "|"]
    cols = decode["columns"]
    builtin = cols.get("built-in bf16")
    for name in ("ours bf16", "ours int4", "built-in bf16"):
        if name not in cols:
            if name == "built-in bf16":
                why = decode["builtin"] if decode["builtin"] is not True else "left out"
                lines.append(f"| built-in bf16 | n/a | n/a | n/a | n/a | ({why}) |")
            continue
        c = cols[name]
        label = f"built-in bf16 ({_impl(c['variant'])})" if name == "built-in bf16" else name
        vs = f"{c['tokens_per_s'] / builtin['tokens_per_s']:.2f}x" if builtin else "n/a"
        lines.append(f"| {label} | {c['median_s'] * 1e3:.1f} | {c['tokens_per_s']:.1f} | "
                     f"{c['ceiling_tokens_per_s']:.1f} | {c['tokens_per_s'] / c['ceiling_tokens_per_s']:.0%} | {vs} |")
    notes = [f"{name} left out ({why})" for name, why in decode["dropped"].items()]
    if "builtin_logits_rel_err" in decode:
        notes.append("built-in logits vs ours on the prompt: relative difference "
                     f"{decode['builtin_logits_rel_err']:.1e}")
    return "\n".join(lines + ([""] + notes if notes else []))


def require_matplotlib() -> None:
    """--plot's dependency, checked before minutes of measuring."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from None


def plot(results: Dict[str, Any], path: str) -> None:
    """Bars: time per call per token count (floors, ours, built-in), and decode tokens/s against the ceilings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["block"]["rows"]
    fig = Figure(figsize=(3.3 * (len(rows) + 1), 4.2), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rows) + 1, squeeze=False)[0]

    def bars(ax: Any, items: List[Tuple[str, Optional[float], str]], unit: str) -> None:
        items = [(label, v, color) for label, v, color in items if v is not None and v == v]
        xs = range(len(items))
        ax.bar(xs, [v for _, v, _ in items], color=[c for _, _, c in items])
        ax.set_xticks(list(xs))
        ax.set_xticklabels([label for label, _, _ in items], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        for x, (_, v, _) in zip(xs, items):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=6)

    for ax, row in zip(axes, rows):
        items: List[Tuple[str, Optional[float], str]] = [("bf16 floor", row["bf16_floor_s"] * 1e3, "#9e9e9e")]
        for name, c in row["columns"].items():
            if name.startswith("ours bf16"):
                items.append((name[5:], c["median_s"] * 1e3, "#1f77b4"))
        if "built-in bf16" in row["columns"]:
            c = row["columns"]["built-in bf16"]
            items.append((f"built-in bf16 ({_impl(c['variant'])})", c["median_s"] * 1e3, "#ff7f0e"))
        items.append(("int4 floor", row["int4_floor_s"] * 1e3, "#cfcfcf"))
        for name, c in row["columns"].items():
            if name.startswith("ours int4"):
                items.append((name[5:], c["median_s"] * 1e3, "#2ca02c"))
        bars(ax, items, "ms per call")
        ax.set_title(f"MoE block, {row['tokens']} token{'s' if row['tokens'] != 1 else ''}", fontsize=9)
    decode = results["decode"]
    items = []
    for name, color in (("ours bf16", "#1f77b4"), ("ours int4", "#2ca02c"), ("built-in bf16", "#ff7f0e")):
        if name in decode["columns"]:
            c = decode["columns"][name]
            items.append((name if name != "built-in bf16" else f"built-in ({_impl(c['variant'])})",
                          c["tokens_per_s"], color))
    for name, shade in (("ours bf16", "#9e9e9e"), ("ours int4", "#cfcfcf")):
        if name in decode["columns"]:
            items.append((f"{name[5:]} ceiling", decode["columns"][name]["ceiling_tokens_per_s"], shade))
    bars(axes[-1], items, "tokens/s")
    axes[-1].set_title(f"decode, {decode['layers']} layers, vocab {decode['vocab']}", fontsize=9)
    info = results["machine"]
    fig.suptitle(f"qwen2-moe-hf bench  {info['date']}  {info['cpu']}, {info['threads']} threads  "
                 f"torch {info['torch']}, transformers {info['transformers']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="token counts of the MoE block section (default: 1 16 256; with --quick 1 8)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the decode model (default: 2)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary of the decode model (default: 32000; the real one is 151936)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens decoded per generate (default: 32; with --quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds, medians taken (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and 2 rounds: checks that everything runs, measures nothing real")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers (every round) to FILE")
    parser.add_argument("--plot", metavar="FILE.png",
                        help=f"draw the tables to a PNG (needs matplotlib: {PLOT_EXTRA})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--vs-llamacpp", action="store_true",
                        help="instead: whole-model decode and prefill against llama.cpp and the built-in on the same "
                             "weights (bench_llamacpp.py; its own options follow: --vs-llamacpp --help lists them; "
                             f"needs {LLAMACPP_EXTRA})")


def _writable(flag: str, path: str, suffix: Optional[str] = None) -> None:
    if suffix and not path.lower().endswith(suffix):
        raise BenchError(f"{flag}: expected a {suffix} file name, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BenchError(f"{flag}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise BenchError(f"{flag}: {path} is a folder")


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults (real or --quick) and checks; a bad value is an error naming its flag."""
    quick = args.quick
    s = Settings(shape=dict(QUICK_SHAPE if quick else SHAPE),
                 tokens=args.tokens if args.tokens is not None else ([1, 8] if quick else [1, 16, 256]),
                 layers=args.layers if args.layers is not None else (1 if quick else 2),
                 vocab=args.vocab if args.vocab is not None else (QUICK_SHAPE["vocab_size"] if quick else 32000),
                 repeats=args.repeats if args.repeats is not None else (2 if quick else 5),
                 prompt=4 if quick else 16,
                 new_tokens=args.new_tokens if args.new_tokens is not None else (8 if quick else 32),
                 read_bytes=(64 if quick else 512) << 20, progress=not args.no_progress, quick=quick)
    if not s.tokens or any(t < 1 for t in s.tokens):
        raise BenchError(f"--tokens: expected counts >= 1, got {s.tokens}")
    if s.layers < 1:
        raise BenchError(f"--layers: expected >= 1, got {s.layers}")
    if s.vocab < s.prompt + 1:
        raise BenchError(f"--vocab: expected >= {s.prompt + 1}, got {s.vocab}")
    if s.new_tokens < 2:
        raise BenchError(f"--new-tokens: expected >= 2 (steps are timed between the first and the last), "
                         f"got {s.new_tokens}")
    if s.repeats < 1:
        raise BenchError(f"--repeats: expected >= 1, got {s.repeats}")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads: expected >= 1, got {args.threads}")
    if args.plot:
        _writable("--plot", args.plot, ".png")
        require_matplotlib()
    if args.json:
        _writable("--json", args.json)
    return s


def bench(settings: Settings) -> Dict[str, Any]:
    """Both sections; returns the raw numbers (see --json)."""

    steps = 1 + 2 + len(settings.tokens) * (1 + settings.repeats) + 3 + settings.repeats
    torch.manual_seed(0)
    info = machine_info()
    with tqdm(total=steps, desc="qwen2-moe-hf bench", unit="step", disable=not settings.progress) as bar:
        bar.set_postfix_str(f"building a {settings.layers}-layer model")
        model = new_model(settings.shape, settings.layers, settings.vocab)
        bar.update(1)
        # The block is the model's first MoE layer: one set of random weights, quantized once per section.
        block = measure_block(settings, model.model.layers[0].mlp, bar)
        decode = measure_decode(settings, model, bar)
    return {"machine": info, "settings": {"quick": settings.quick, "repeats": settings.repeats,
                                          "tokens": settings.tokens, "layers": settings.layers,
                                          "vocab": settings.vocab, "new_tokens": settings.new_tokens,
                                          "prompt": settings.prompt},
            "block": block, "decode": decode}


def report(results: Dict[str, Any]) -> str:
    s, b, d = results["settings"], results["block"], results["decode"]
    shape = b["shape"]
    return "\n".join([
        "# qwen2-moe-hf bench" + (" --quick (tiny shapes: not the real layer)" if s["quick"] else ""),
        "",
        header(results["machine"]),
        "",
        f"## MoE block: hidden {shape['hidden_size']}, {shape['num_experts']} experts of "
        f"{shape['moe_intermediate_size']}, top-{shape['num_experts_per_tok']}, shared expert "
        f"{shape['shared_expert_intermediate_size']}; random weights; int4 = GPTQ group {b['group_size']}, sym, "
        f"routed and shared experts. Medians of {s['repeats']} interleaved rounds, ms per call; floor = bytes read "
        f"once / read bandwidth of the same rounds.",
        "",
        block_table(b),
        "",
        f"## Decode: greedy generate, batch 1, {d['layers']} layers of that shape, vocabulary {d['vocab']}, "
        f"{d['prompt']}-token prompt, {d['new_tokens']} new tokens (per-token time from the first to the last "
        f"step; prefill left out), medians of {s['repeats']} interleaved rounds; "
        f"int4 = attention and experts (router, embeddings, lm_head bf16). Ceiling = read bandwidth "
        f"({d['read_bytes_per_s'] / 1e9:.1f} GB/s) / bytes read per token.",
        "",
        decode_table(d),
    ])


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except BenchError as exc:
        print(f"qwen2-moe-hf bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = bench(settings)
    except KeyboardInterrupt:
        print("qwen2-moe-hf bench: interrupted", file=sys.stderr)
        return 130
    print(report(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
