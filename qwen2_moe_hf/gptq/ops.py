"""The schemas of the int4 CPU ops (csrc/cpu/gptq_int4_cpu.cpp: one Linear; csrc/cpu/moe_ffn_cpu.cpp: a whole MoE
layer with GPTQ experts), built with the other CPU ops."""

import torch

from ..moe.ops import LIB

SCHEMA = ("(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int zero_offset, Tensor? bias) "
          "-> Tensor")

MOE_SCHEMA = ("(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] experts, Tensor[] shared, "
              "Tensor? shared_expert_gate, int zero_offset) -> Tensor")

# The same with the router's softmax / top-k done inside, from the router logits.
MOE_BLOCK_SCHEMA = ("(Tensor x, Tensor router_logits, int top_k, bool renormalize, Tensor[] experts, Tensor[] shared, "
                    "Tensor? shared_expert_gate, int zero_offset) -> Tensor")

for _name, _schema in (("moe_ffn_int4_cpu", MOE_SCHEMA), ("moe_block_int4_cpu", MOE_BLOCK_SCHEMA)):
    if not hasattr(getattr(torch.ops, LIB), _name):
        torch.library.define(f"{LIB}::{_name}", _schema)

        @torch.library.register_fake(f"{LIB}::{_name}")
        def _(x, *args):
            return torch.empty_like(x)

if not hasattr(getattr(torch.ops, LIB), "gptq_linear_cpu"):
    torch.library.define(f"{LIB}::gptq_linear_cpu", SCHEMA)

    @torch.library.register_fake(f"{LIB}::gptq_linear_cpu")
    def _(x, qweight, qzeros, scales, g_idx, zero_offset, bias):
        return x.new_empty(x.shape[0], qweight.shape[1])
