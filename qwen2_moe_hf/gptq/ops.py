"""The schemas of the int4 CPU ops (csrc/cpu/gptq_int4_cpu.cpp: one Linear; csrc/cpu/moe_ffn_cpu.cpp: a whole MoE
layer with GPTQ experts), built with the other CPU ops."""

import torch

from ..moe.ops import LIB

SCHEMA = ("(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int zero_offset, Tensor? bias) "
          "-> Tensor")

MOE_SCHEMA = ("(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] experts, Tensor[] shared, "
              "Tensor? shared_expert_gate, int zero_offset) -> Tensor")

if not hasattr(getattr(torch.ops, LIB), "moe_ffn_int4_cpu"):
    torch.library.define(f"{LIB}::moe_ffn_int4_cpu", MOE_SCHEMA)

    @torch.library.register_fake(f"{LIB}::moe_ffn_int4_cpu")
    def _(x, *args):
        return torch.empty_like(x)

if not hasattr(getattr(torch.ops, LIB), "gptq_linear_cpu"):
    torch.library.define(f"{LIB}::gptq_linear_cpu", SCHEMA)

    @torch.library.register_fake(f"{LIB}::gptq_linear_cpu")
    def _(x, qweight, qzeros, scales, g_idx, zero_offset, bias):
        return x.new_empty(x.shape[0], qweight.shape[1])
