"""The schema of the int4 CPU op (implementation: csrc/cpu/gptq_int4_cpu.cpp, built with the other CPU ops)."""

import torch

from ..moe.ops import LIB

SCHEMA = ("(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int zero_offset, Tensor? bias) "
          "-> Tensor")

if not hasattr(getattr(torch.ops, LIB), "gptq_linear_cpu"):
    torch.library.define(f"{LIB}::gptq_linear_cpu", SCHEMA)

    @torch.library.register_fake(f"{LIB}::gptq_linear_cpu")
    def _(x, qweight, qzeros, scales, g_idx, zero_offset, bias):
        return x.new_empty(x.shape[0], qweight.shape[1])
