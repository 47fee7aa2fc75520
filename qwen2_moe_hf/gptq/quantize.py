"""Writing GPTQ checkpoints: round-to-nearest (RTN) quantization of a full-precision qwen2_moe checkpoint.

`qwen2-moe-hf quantize --method rtn --bits 4 --group-size 128 SRC DST` calls quantize_checkpoint(). What is
quantized matches the released Qwen1.5-MoE GPTQ checkpoints: every Linear inside a decoder layer (attention, the
shared expert, each routed expert, dense MLPs) except the router `mlp.gate` and `mlp.shared_expert_gate`;
embeddings, norms and lm_head stay full precision. The output is the AutoGPTQ layout (format.py), sharded like
the hub's checkpoints, and reads back through our loader and through auto-gptq's QuantLinear.
"""

import json
import os
import re
import shutil
from typing import Any, Dict, Iterable, List, Mapping, Union

import torch
from torch import nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..files import INDEX_FILE, SafetensorsFile, new_folder, read_config_json, weight_files
from .format import FORMATS, GPTQSpec, quantize_rtn
from .linear import GPTQLinear

QUANTIZED = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.((?:self_attn\.[qkvo]_proj)|(?:mlp\.(?:shared_expert\.|experts\.\d+\.)?"
    r"(?:gate|up|down)_proj))\.weight$"
)
_COPIED = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def quantize_linears_(root: nn.Module, names: Iterable[str], spec: GPTQSpec) -> nn.Module:
    """Replace the nn.Linear submodules `names` of `root` by GPTQLinear holding their RTN-quantized weights
    (in place, in memory; for benchmarks and experiments). Returns root."""
    for name in names:
        linear = root.get_submodule(name)
        packed = quantize_rtn(linear.weight, spec.bits, spec.group_size, spec.sym, spec.zero_offset)
        layer = GPTQLinear(linear.in_features, linear.out_features, linear.bias is not None, spec)
        for part, value in packed.items():
            layer._buffers[part] = value.to(linear.weight.device)
        if linear.bias is not None:
            layer._buffers["bias"] = linear.bias.detach().to(torch.float16)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, layer)
    return root


def _parse_size(value: Union[int, str]) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(value).upper())
    if not match:
        raise ValueError(f"max_shard_size: expected e.g. '2GB', got {value!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _block_groups(names: Iterable[str]) -> List[List[str]]:
    """modules_in_block_to_quantize in the released checkpoints' grouping (the order GPTQ quantizes them)."""
    order = [r"self_attn\.[kvq]_proj", r"self_attn\.o_proj", r"mlp\.shared_expert\.(up|gate)_proj",
             r"mlp\.shared_expert\.down_proj", r"mlp\.experts\.\d+\.(up|gate)_proj", r"mlp\.experts\.\d+\.down_proj",
             r"mlp\.(up|gate)_proj", r"mlp\.down_proj"]
    groups = []
    for pattern in order:
        group = sorted((n for n in names if re.fullmatch(pattern, n)),
                       key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
        if group:
            groups.append(group)
    return groups


def quantize_checkpoint(src: str, dst: str, bits: int = 4, group_size: int = 128, sym: bool = True,
                        method: str = "rtn", checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float16,
                        max_shard_size: Union[int, str] = "2GB", progress: bool = True, overwrite: bool = False) -> str:
    """Quantize the safetensors checkpoint folder `src` into the GPTQ checkpoint folder `dst`. Returns dst.

    The source is only read. dst must not be, lie inside or contain src, and must be new or empty unless
    `overwrite`; everything is written into a temporary folder beside dst that takes its place at the end, so an
    error or Ctrl-C at any point leaves dst absent (or as it was)."""
    if method != "rtn":
        raise ValueError(f"method: only 'rtn' (round to nearest) is implemented, got {method!r}")
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format: {checkpoint_format!r} (supported: {', '.join(sorted(FORMATS))})")
    spec = GPTQSpec.from_dict({"bits": bits, "group_size": group_size, "sym": sym,
                               "checkpoint_format": checkpoint_format})
    limit = _parse_size(max_shard_size)
    config = read_config_json(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: config.json already has a quantization_config; quantize a full-precision "
                         "checkpoint")
    files = weight_files(src)
    with new_folder(dst, overwrite=overwrite, protect=[src]) as out:
        _quantize_into(src, out, files, config, spec, dtype, limit, progress)
    return dst


def _quantize_into(src: str, out: str, files: Mapping[str, SafetensorsFile], config: Dict[str, Any], spec: GPTQSpec,
                   dtype: torch.dtype, limit: int, progress: bool) -> None:
    bits = spec.bits
    targets = [k for k in files if QUANTIZED.match(k)]
    bar = tqdm(total=len(targets), desc="quantizing", unit="linear", disable=not progress)

    # Only names and sizes are kept once a shard is written: the output is never held in memory as a whole.
    shards: List[Dict[str, int]] = []
    current, current_size, block_names = {}, 0, set()

    def flush() -> None:
        nonlocal current, current_size
        if current:
            shards.append({name: t.numel() * t.element_size() for name, t in current.items()})
            _write_shard(out, len(shards), current)
        current, current_size = {}, 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal current_size
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > limit:
            flush()
        current[name] = tensor.contiguous()
        current_size += size

    try:
        for key in sorted(files, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]):
            if key.endswith(".bias") and QUANTIZED.match(key[: -len(".bias")] + ".weight"):
                continue  # written with its layer's packed tensors
            tensor = files[key].read(key)
            match = QUANTIZED.match(key)
            if match is None:
                add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                continue
            prefix = key[: -len(".weight")]
            block_names.add(match.group(2))
            out_features, in_features = tensor.shape
            per_int = 32 // bits
            if in_features % per_int or out_features % per_int:
                raise ValueError(f"{key}: shape {list(tensor.shape)}; GPTQ needs both sizes to be multiples of "
                                 f"{per_int} at {bits} bits")
            packed = quantize_rtn(tensor, bits, spec.group_size, spec.sym, spec.zero_offset)
            for part, value in packed.items():
                add(f"{prefix}.{part}", value)
            bias_key = prefix + ".bias"
            if bias_key in files:
                add(bias_key, files[bias_key].read(bias_key).to(torch.float16))
            bar.update(1)
        flush()
    finally:
        bar.close()
    _write_index(out, shards)

    config["quantization_config"] = spec.to_dict(_block_groups(block_names))
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    for name in os.listdir(src):
        if name.endswith(_COPIED) and name not in ("config.json", INDEX_FILE):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _shard_name(index: int) -> str:
    return f"model-{index:05d}.safetensors"


def _write_shard(dst: str, index: int, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(tensors, os.path.join(dst, _shard_name(index)), metadata={"format": "pt"})


def _write_index(dst: str, shards: List[Dict[str, int]]) -> None:
    total = len(shards)
    weight_map, size = {}, 0
    for i, shard in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(dst, _shard_name(i)), os.path.join(dst, final))
        for name, nbytes in shard.items():
            weight_map[name] = final
            size += nbytes
    with open(os.path.join(dst, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
