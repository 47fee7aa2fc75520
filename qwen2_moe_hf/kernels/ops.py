"""Every custom op of the package (namespace `qwen2_moe_hf`): its schema and its fake, defined once for every device.

The C++ files in kernels/csrc/ only register implementations (CPU in csrc/cpu, CUDA in csrc/cuda), and each checks
its own arguments (csrc/common/checks.h). The fakes give torch.compile and CUDA-graph capture the output shapes without
running the ops. They are also what the dispatcher runs when any argument is a meta tensor, so each fake first
checks that every tensor argument is on one device: a meta tensor mixed with real CPU tensors would otherwise get
an uninitialised CPU tensor back instead of an error.
"""

from typing import Dict, List, Optional, Sequence, Union

import torch

LIB = "qwen2_moe_hf"

_MOE_WEIGHTS = "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, Tensor? shared_expert_gate"
SCHEMAS: Dict[str, str] = {
    "topk_softmax": "(Tensor logits, int k, bool renormalize) -> (Tensor, Tensor)",
    "moe_align": "(Tensor ids, int num_experts, int block) -> (Tensor, Tensor, Tensor)",
    "moe_combine": "(Tensor expert_out, Tensor weights, Tensor? shared_out, Tensor? shared_gate) -> Tensor",
    "moe_ffn_cpu": "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] w_gate, Tensor[] w_up, "
    f"Tensor[] w_down, {_MOE_WEIGHTS}) -> Tensor",
    # One GPTQ 4-bit Linear (csrc/cpu/gptq_int4_cpu.cpp).
    # qweight: [K/8, N], or blocked [N/64, K/8, 64] (gptq/format.py's block_qweight).
    "gptq_linear_cpu": "(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int zero_offset, "
    "Tensor? bias) -> Tensor",
    # Several GPTQ 4-bit Linears on the same x (an attention layer's q, k, v): 4 tensors per Linear in `linears`
    # (qweight, qzeros, scales, g_idx), one bias or None per Linear.
    "gptq_linears_cpu": "(Tensor x, Tensor[] linears, Tensor?[] biases, int zero_offset) -> Tensor[]",
    # One dense Linear for a decode step's few rows (csrc/cpu/moe_ffn_cpu.cpp: the experts' streaming kernels).
    "dense_linear_cpu": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    # A decode step's attention for one query position, and RMSNorm (csrc/cpu/decode_cpu.cpp).
    "decode_attention_cpu": "(Tensor query, Tensor key, Tensor value, Tensor? mask, float scaling) -> Tensor",
    "rms_norm_cpu": "(Tensor x, Tensor weight, float eps) -> Tensor",
    # RoPE on a step's query and key (csrc/cpu/decode_cpu.cpp); cos / sin [batch or 1, length, head_dim].
    "rope_cpu": "(Tensor query, Tensor key, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
    # The MoE layer with GPTQ 4-bit experts: 12 tensors per expert (qweight, qzeros, scales, g_idx of gate, up,
    # down), the shared expert's 12 or none.
    "moe_ffn_int4_cpu": "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] experts, Tensor[] shared, "
    "Tensor? shared_expert_gate, int zero_offset) -> Tensor",
}

TensorArgs = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


def one_device(op: str, **tensors: TensorArgs) -> torch.device:
    """The device every tensor argument is on; raises naming the first argument on another one."""
    device, first = None, None
    for name, value in tensors.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if item is None:
                continue
            label = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            if device is None:
                device, first = item.device, label
            elif item.device != device:
                raise RuntimeError(f"{op}: {label} is on {item.device} but {first} is on {device}; every tensor "
                                   "argument must be on one device")
    return device


def _check_2d(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise RuntimeError(f"{op}: {name} must be 2-D, got shape {list(t.shape)}")


def _moe_fake(op: str, x: torch.Tensor, tensors: Dict[str, TensorArgs]) -> torch.Tensor:
    one_device(op, x=x, **tensors)
    _check_2d(op, "x", x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _define() -> None:
    ns = getattr(torch.ops, LIB)
    for name, schema in SCHEMAS.items():
        if not hasattr(ns, name):
            torch.library.define(f"{LIB}::{name}", schema)

    @torch.library.register_fake(f"{LIB}::topk_softmax")
    def _(logits, k, renormalize):
        one_device("topk_softmax", logits=logits)
        _check_2d("topk_softmax", "logits", logits)
        return (logits.new_empty(logits.shape[0], k, dtype=torch.float32),
                logits.new_empty(logits.shape[0], k, dtype=torch.long))

    @torch.library.register_fake(f"{LIB}::moe_align")
    def _(ids, num_experts, block):
        one_device("moe_align", ids=ids)
        # Fixed upper-bound sizes, whatever the routing (so that no host sync is needed on GPU).
        blocks = (ids.numel() + num_experts * (block - 1) + block - 1) // block
        return (ids.new_empty(blocks * block, dtype=torch.int32), ids.new_empty(blocks, dtype=torch.int32),
                ids.new_empty(num_experts + 1, dtype=torch.int32))

    @torch.library.register_fake(f"{LIB}::moe_combine")
    def _(expert_out, weights, shared_out, shared_gate):
        one_device("moe_combine", expert_out=expert_out, weights=weights, shared_out=shared_out,
                   shared_gate=shared_gate)
        _check_2d("moe_combine", "expert_out", expert_out)
        _check_2d("moe_combine", "weights", weights)
        return expert_out.new_empty(weights.shape[0], expert_out.shape[1])

    @torch.library.register_fake(f"{LIB}::moe_ffn_cpu")
    def _(x, topk_ids, topk_weights, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
          shared_expert_gate):
        return _moe_fake("moe_ffn_cpu", x, dict(
            topk_ids=topk_ids, topk_weights=topk_weights, w_gate=w_gate, w_up=w_up, w_down=w_down,
            shared_gate=shared_gate, shared_up=shared_up, shared_down=shared_down,
            shared_expert_gate=shared_expert_gate))

    @torch.library.register_fake(f"{LIB}::gptq_linear_cpu")
    def _(x, qweight, qzeros, scales, g_idx, zero_offset, bias):
        one_device("gptq_linear_cpu", x=x, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=bias)
        _check_2d("gptq_linear_cpu", "x", x)
        if qweight.dim() == 3:  # blocked [N/64, K/8, 64] (gptq/format.py)
            return x.new_empty(x.shape[0], qweight.shape[0] * qweight.shape[2])
        _check_2d("gptq_linear_cpu", "qweight", qweight)
        return x.new_empty(x.shape[0], qweight.shape[1])

    @torch.library.register_fake(f"{LIB}::gptq_linears_cpu")
    def _(x, linears, biases, zero_offset):
        one_device("gptq_linears_cpu", x=x, linears=linears, biases=biases)
        _check_2d("gptq_linears_cpu", "x", x)
        if not linears or len(linears) % 4 or len(biases) != len(linears) // 4:
            raise RuntimeError(f"gptq_linears_cpu: expected 4 weights and one bias entry per Linear, got "
                               f"{len(linears)} tensors and {len(biases)} biases")
        outs = []
        for i in range(0, len(linears), 4):
            qweight = linears[i]
            n = qweight.shape[0] * qweight.shape[2] if qweight.dim() == 3 else qweight.shape[-1]
            outs.append(x.new_empty(x.shape[0], n))
        return outs

    @torch.library.register_fake(f"{LIB}::dense_linear_cpu")
    def _(x, weight, bias):
        one_device("dense_linear_cpu", x=x, weight=weight, bias=bias)
        _check_2d("dense_linear_cpu", "x", x)
        _check_2d("dense_linear_cpu", "weight", weight)
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(f"{LIB}::decode_attention_cpu")
    def _(query, key, value, mask, scaling):
        one_device("decode_attention_cpu", query=query, key=key, value=value, mask=mask)
        if query.dim() != 4 or query.shape[2] != 1:
            raise RuntimeError(f"decode_attention_cpu: query must have shape [batch, heads, 1, head_dim], got "
                               f"{list(query.shape)}")
        return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])

    @torch.library.register_fake(f"{LIB}::rms_norm_cpu")
    def _(x, weight, eps):
        one_device("rms_norm_cpu", x=x, weight=weight)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{LIB}::rope_cpu")
    def _(query, key, cos, sin):
        one_device("rope_cpu", query=query, key=key, cos=cos, sin=sin)
        return (torch.empty_like(query, memory_format=torch.contiguous_format),
                torch.empty_like(key, memory_format=torch.contiguous_format))

    @torch.library.register_fake(f"{LIB}::moe_ffn_int4_cpu")
    def _(x, topk_ids, topk_weights, experts, shared, shared_expert_gate, zero_offset):
        return _moe_fake("moe_ffn_int4_cpu", x, dict(topk_ids=topk_ids, topk_weights=topk_weights,
                                                     experts=experts, shared=shared,
                                                     shared_expert_gate=shared_expert_gate))


_define()

__all__: List[str] = ["LIB", "SCHEMAS", "one_device"]
