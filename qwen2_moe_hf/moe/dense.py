"""DecodeLinear: the dense Linear layers around the MoE blocks (attention projections, lm_head) on the CPU ops'
streaming GEMV for a decode step's few rows; nn.Linear for everything else."""

import torch
from torch import nn

from ..kernels.build import load_cpu_ops

# Rows of x up to which DecodeLinear streams its bf16 weight itself (the CPU ops' kStreamRows).
DECODE_ROWS = 4


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, state dict and hooks) whose CPU calls on a decode step's few rows of bf16 go to
    the CPU ops' streaming GEMV (`dense_linear_cpu`): oneDNN's bf16 GEMV reads the weight at 13-19 GB/s where ours
    reads it at 28-32 (lm_head: 32.7 -> 22.2 ms per token; docs/benchmarks.md). Same math: fp32 sums, the output
    rounded once. Anything else (more rows, other dtypes or devices, gradients, torch.compile, distributed
    weights) is nn.Linear's own forward. Used for the attention projections and lm_head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
                and type(w) in (nn.Parameter, torch.Tensor) and x.dim() >= 1
                and x.numel() <= DECODE_ROWS * x.shape[-1]
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling() and load_cpu_ops()[0]):
            y = torch.ops.qwen2_moe_hf.dense_linear_cpu(x.reshape(-1, x.shape[-1]), w, self.bias)
            return y.view(*x.shape[:-1], w.shape[0])
        return super().forward(x)
