"""The `triton` backend (GPU): the routed experts through the Triton kernel family of kernels/triton_moe.py, dense
or GPTQ 4-bit (the same kernels, a constexpr weight-tile load). Its address table is built once per prepared
weights; as it holds raw addresses, every call also checks that no tensor was given new storage in place
(`param.data = ...`), one C-level pass over the tensors' data pointers. Triton is an optional dependency, imported
on first use: importing it fixes its interpreter mode, which the tests set first."""

import functools
import importlib.util
from typing import Any, List, Optional, Tuple

import torch

from ..weights import ExpertWeights

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def available() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install qwen2_moe_hf[triton])"
    if not torch.cuda.is_available():
        return False, "no CUDA device (the Triton kernels are tested on CPU under TRITON_INTERPRET=1)"
    return True, ""


def supports(weights: ExpertWeights, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"inputs on {device}, not cuda"
    if dtype not in _DTYPES:
        return f"dtype {dtype}"
    if weights.kind is None:
        return weights.reason
    if weights.device != device:
        return f"expert weights on {weights.device}, inputs on {device}"
    if weights.kind == "dense" and weights.dtype != dtype:
        return f"expert weights in {weights.dtype}, inputs in {dtype}"
    tensors = weights.projection_tensors()
    if not all(t.is_contiguous() for t in tensors):
        return "expert weights are not contiguous"
    if any(t.data_ptr() % 16 for t in tensors):  # the kernels tell Triton every weight address is 16-byte aligned
        return "expert weights are not 16-byte aligned (views at odd offsets)"
    return None


def _tables(weights: ExpertWeights) -> Tuple[Any, List[int]]:
    from ...kernels import triton_moe

    int4 = weights.kind == "int4"
    lists = [[p.tensors() if int4 else p for p in linear] for linear in (weights.gate, weights.up, weights.down)]
    tables = triton_moe.expert_tables(*lists, int4=int4, zero_offset=weights.zero_offset, device=weights.device)
    return tables, list(map(torch.Tensor.data_ptr, tables.tensors))


def _addresses_hold(entry: Tuple[Any, List[int]]) -> bool:
    tables, addresses = entry
    return list(map(torch.Tensor.data_ptr, tables.tensors)) == addresses


def experts_triton(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   weights: ExpertWeights) -> torch.Tensor:
    from ...kernels import triton_moe

    tables, _ = weights.cached("triton.tables", lambda: _tables(weights), valid=_addresses_hold)
    return triton_moe.routed_experts(hidden_states, top_k_index, top_k_weights, tables)
