"""GPTQLinear: an nn.Linear stored in the GPTQ format, computed by int4 kernels.

Its buffers are the checkpoint's own tensors (qweight, qzeros, scales, g_idx, optional bias), so state_dict() and
save_pretrained() write the format back unchanged and nothing is held twice. One exception, made once after a CPU
load (`use_blocked_layout`): a 4-bit qweight [K/8, N] is held as the same words blocked [N/64, K/8, 64]
(format.block_qweight), which the CPU kernels read ~2x faster from memory in a decode step; state_dict() still
gives the checkpoint layout (an unblocked copy; the model's save_pretrained unblocks in place instead:
`checkpoint_layout`), load_state_dict takes it, and moving the layer off the CPU restores it.
forward(x) picks a kernel by device:
  cpu  -> the gptq_linear_cpu op (kernels/csrc/cpu/gptq_int4_cpu.cpp: 4 bits, reads the packed layout directly)
  cuda -> kernels/triton_moe.py's gptq_linear_triton (4 bits; in-kernel dequantization) when triton is installed
  else -> the reference: dequantize (format.dequantize) and F.linear. It is also the oracle of the tests, the
          path for 8 bits, and what runs when autograd needs a backward (the weights are frozen; inputs get grads).
Env QWEN2_MOE_HF_GPTQ_KERNEL=torch forces the reference in this layer's forward (the MoE backends that read the
4-bit tensors themselves, cpu and triton, are chosen with moe_backend instead).

As an `Int4Projection` (moe/weights.py) it hands its 4-bit tensors to the MoE backends, which read a layer's
experts at once.
"""

import contextlib
import functools
import importlib.util
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..kernels.build import load_cpu_ops
from ..moe.weights import Int4Projection, Int4Tensors
from . import format as gptq_format
from .format import GPTQSpec

ENV_KERNEL = "QWEN2_MOE_HF_GPTQ_KERNEL"
# "checkpoint" keeps qweight in the checkpoint layout after a CPU load (benchmarks' A/B; anything else: blocked).
ENV_LAYOUT = "QWEN2_MOE_HF_INT4_LAYOUT"


class GPTQLinear(nn.Module, Int4Projection):
    def __init__(self, in_features: int, out_features: int, bias: bool, spec: GPTQSpec,
                 device: Optional[Union[torch.device, str]] = None, scales_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = spec.bits
        self.group_size = spec.group_size
        self.zero_offset = spec.zero_offset
        shapes = spec.tensor_shapes(in_features, out_features)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32, device=device))
        # A buffer even when absent (None), so that a bias set later goes where the MoE backends look.
        self.register_buffer("bias", torch.zeros(out_features, dtype=scales_dtype, device=device) if bias else None)

    # AutoGPTQ's names for the sizes: PEFT reads them to size LoRA adapters on a quantized layer (qwen2_moe_hf.lora).
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def extra_repr(self) -> str:
        group = "none" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={group}, bias={self.bias is not None}")

    @property
    def blocked(self) -> bool:
        """Whether qweight is held in the blocked layout [N/64, K/8, 64] (use_blocked_layout)."""
        return self.qweight is not None and self.qweight.dim() == 3

    def checkpoint_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint layout [K/8, N] (the buffer itself, or an unblocked copy)."""
        return gptq_format.unblock_qweight(self.qweight) if self.blocked else self.qweight

    def use_blocked_layout(self, blocked: bool = True, scratch: Optional[torch.Tensor] = None) -> bool:
        """Hold qweight blocked (True) or in the checkpoint layout (False); returns whether it is blocked.
        Blocking is done only where the CPU kernels read it: 4 bits, a plain CPU tensor, out_features a multiple
        of 64. The buffer is replaced by a new tensor, unless `scratch` (int32, at least qweight's size) is given:
        then the words are reordered within qweight's own storage through it (the loader's buffers: no memory
        freed and taken again per layer; never a tensor the caller may still hold). The same holds the other way."""
        q = self.qweight
        if not blocked:
            if self.blocked:
                in_place = scratch is not None and q.is_contiguous()
                self.qweight = gptq_format.unblock_qweight_(q, scratch) if in_place else gptq_format.unblock_qweight(q)
            return False
        if (self.blocked or self.bits != 4 or type(q) is not torch.Tensor or q.device.type != "cpu"
                or q.dim() != 2 or q.shape[1] % gptq_format.BLOCK_COLS != 0):
            return self.blocked
        if scratch is not None and q.is_contiguous():
            self.qweight = gptq_format.block_qweight_(q, scratch)
        else:
            self.qweight = gptq_format.block_qweight(q)
        return True

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full-precision weight [out_features, in_features] (for tests and the reference path)."""
        return gptq_format.dequantize(self.checkpoint_qweight(), self.qzeros, self.scales, self.g_idx, self.bits,
                                      self.zero_offset, dtype)

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, qzeros, scales, g_idx): what the int4 kernels read (qweight possibly blocked)."""
        return self.qweight, self.qzeros, self.scales, self.g_idx

    # The checkpoint layout in and out, whatever the layout held.
    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.blocked and prefix + "qweight" in destination:
            destination[prefix + "qweight"] = gptq_format.unblock_qweight(self.qweight.detach())

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.use_blocked_layout(False)  # the checkpoint's qweight is copied (or assigned) into the checkpoint layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> "GPTQLinear":
        # Off the CPU (GPU kernels, meta) qweight goes in the checkpoint layout; a dtype change keeps the blocks.
        if self.blocked and fn(torch.empty(0, dtype=torch.int32)).device.type != "cpu":
            self.use_blocked_layout(False)
        return super()._apply(fn, *args, **kwargs)

    def int4_tensors(self) -> Optional[Int4Tensors]:
        if self.bits != 4 or self.bias is not None:
            return None
        return Int4Tensors(self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset)

    def cpu_linear_args(self, x: torch.Tensor) -> Optional[Tuple[Any, ...]]:
        if kernel_for(x, self.bits) != "cpu" or x.dim() == 0 or x.shape[-1] != self.in_features:
            return None
        b = self._buffers  # read once: a decode step asks this of q, k and v in every layer
        return b["qweight"], b["qzeros"], b["scales"], b["g_idx"], self.zero_offset, b["bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        kernel = kernel_for(x2, self.bits)
        if kernel == "cpu":
            b = self._buffers
            y = torch.ops.qwen2_moe_hf.gptq_linear_cpu.default(x2, b["qweight"], b["qzeros"], b["scales"], b["g_idx"],
                                                               self.zero_offset, b["bias"])
        elif kernel == "triton":
            from ..kernels.triton_moe import gptq_linear_triton  # triton: optional, imported on first use

            y = gptq_linear_triton(x2, self.checkpoint_qweight(), self.qzeros, self.scales, self.g_idx, self.bits,
                                   self.zero_offset, self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(x2.dtype)
            y = nn.functional.linear(x2, self.dequantize(x2.dtype), bias)
        return y.reshape(*shape[:-1], self.out_features)


def use_blocked_layout(model: nn.Module, blocked: bool = True, in_place: bool = False) -> int:
    """Every GPTQLinear of `model` whose kernels read it on CPU holds qweight blocked (True; unless
    QWEN2_MOE_HF_INT4_LAYOUT=checkpoint) or in the checkpoint layout (False). in_place: reorder within the
    buffers' own storage (the loader, which made them). Returns how many layers are blocked."""
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    if not blocked or os.environ.get(ENV_LAYOUT, "").lower() == "checkpoint":
        return sum(m.use_blocked_layout(False) for m in layers)
    on_cpu = [m for m in layers if m.qweight is not None and m.qweight.device.type == "cpu"]
    scratch = _scratch(on_cpu) if in_place else None
    return sum(m.use_blocked_layout(scratch=scratch) for m in layers)


def _scratch(layers: List["GPTQLinear"]) -> torch.Tensor:
    """One int32 buffer that can hold any of these layers' qweights: what an in-place reorder copies through."""
    return torch.empty(max((m.qweight.numel() for m in layers), default=0), dtype=torch.int32)


@contextlib.contextmanager
def checkpoint_layout(model: nn.Module) -> Iterator[int]:
    """For the duration, every GPTQLinear of `model` holding qweight blocked holds it in the checkpoint layout
    instead, reordered within its own storage; blocked again after, also on error. Yields how many were blocked.
    Why: state_dict() gives a blocked layer's qweight as an unblocked copy, so saving a loaded model held a second
    copy of every int4 weight (~7 GB for the 24-layer Qwen1.5-MoE-A2.7B); inside, the buffers themselves are saved.
    What state_dict() returns inside must not outlive it: the buffers are blocked again in place."""
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear) and m.blocked and m.qweight.is_contiguous()]
    scratch = _scratch(layers)
    unblocked = []
    try:
        for m in layers:
            m.use_blocked_layout(False, scratch=scratch)
            unblocked.append(m)
        yield len(layers)
    finally:
        for m in unblocked:
            m.use_blocked_layout(True, scratch=scratch)


_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_for(x: torch.Tensor, bits: int) -> str:
    """"cpu" | "triton" | "torch": the kernel that computes a GPTQ linear for input x."""
    if bits != 4 or os.environ.get(ENV_KERNEL, "").lower() == "torch":
        return "torch"
    if x.requires_grad and torch.is_grad_enabled():
        return "torch"  # the int4 kernels have no backward
    if x.is_cpu and x.dtype in _CPU_DTYPES and _cpu_kernel():  # is_cpu: a tenth of .device.type's cost
        return "cpu"
    if x.is_cuda and _triton_installed():
        return "triton"
    return "torch"


@functools.lru_cache(maxsize=None)
def _cpu_kernel() -> bool:
    return load_cpu_ops()[0]


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
