"""GPTQ as a plug-in of the load plan (loading/plan.py): how a GPTQ checkpoint is recognised, which Linears become
GPTQLinear, how one quantized layer's tensors are checked and read, and which dtype the model computes in.

Why not transformers' GPTQ quantizer: transformers 4.38 hands GPTQ to optimum / auto-gptq, which would also wrap
the router and shared_expert_gate, and transformers 5.x fuses experts into 3-D tensors and drops the per-expert int4
tensors (the experts end up randomly initialised). Our model's from_pretrained sends GPTQ checkpoints here,
whatever GPTQ libraries are installed, so those quantizers never run for it.
"""

import logging
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .. import compat
from ..files import SafetensorsFile, read_json_object
from .format import GPTQFormatError, GPTQSpec, check_tensors
from .linear import GPTQLinear

logger = logging.getLogger("qwen2_moe_hf")

QUANTIZE_CONFIG_FILE = "quantize_config.json"
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_LAYER_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)$")

Files = Mapping[str, SafetensorsFile]


def settings(config_file: Optional[str], legacy_file: Optional[str], config: Any) -> Optional[Tuple[dict, str]]:
    """(GPTQ settings dict, where they came from) or None when the checkpoint is not GPTQ. `config` is a config the
    caller passed (its quantization_config is used), else config.json's is read; `legacy_file` is a
    quantize_config.json beside it, if any (older checkpoints)."""
    if config is None:
        if config_file is None:
            return None
        raw = read_json_object(config_file).get("quantization_config")
    else:
        raw = getattr(config, "quantization_config", None)
    if raw is not None:
        if hasattr(raw, "to_dict"):
            raw = raw.to_dict()
        method = str(raw.get("quant_method", "")).lower() if isinstance(raw, dict) else ""
        return (raw, "config.json quantization_config") if method == "gptq" else None
    if legacy_file is not None:
        return read_json_object(legacy_file), QUANTIZE_CONFIG_FILE
    return None


class GPTQHooks:
    """What the load plan asks of a quantization format (see loading/plan.py)."""

    def __init__(self, spec: GPTQSpec) -> None:
        self.spec = spec

    def compute_dtype(self, value: Any, config: Any) -> torch.dtype:
        """transformers' GPTQ rule: None / "auto" -> the checkpoint's dtype, float16 for float32 or unset (GPTQ
        scales are fp16); else float16, bfloat16 or float32."""
        if value is None or value == "auto":
            value = compat.config_dtype(config) or torch.float16
            if value == torch.float32 or value == "float32":
                value = torch.float16
        if isinstance(value, str):
            value = getattr(torch, value, None) if value.startswith(("float", "bfloat")) else None
        if value not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype: GPTQ models compute in float16, bfloat16 or float32, got {value!r}")
        return value

    def swap_linears(self, model: nn.Module, files: Files, key_of: Callable[[str], str]) -> Dict[str, str]:
        """Replace every nn.Linear the checkpoint stores as GPTQ (`<name>.qweight`) by a GPTQLinear on meta, and
        check the list of quantized modules against quantization_config. Returns {module name: checkpoint prefix}."""
        quantized, per_layer = {}, set()
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            ckpt = key_of(name)
            layer = _LAYER_NAME.match(name)
            if layer:
                per_layer.add(layer.group(2))
            if f"{ckpt}.qweight" not in files:
                continue
            scales = f"{ckpt}.scales"
            scales_dtype = files[scales].dtype_shape(scales)[0] if scales in files else torch.float16
            replacement = GPTQLinear(module.in_features, module.out_features, self._keeps_bias(files, ckpt),
                                     self.spec, device="meta", scales_dtype=scales_dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            quantized[name] = ckpt
        listed = self.spec.modules_in_block_to_quantize
        if listed:
            unknown = sorted(listed - per_layer)
            if unknown:
                raise GPTQFormatError(f"quantization_config.modules_in_block_to_quantize: {unknown[:5]} name no "
                                      f"Linear in a decoder layer of this model (e.g. {sorted(per_layer)[:3]})")
            for name, module in model.named_modules():
                layer = _LAYER_NAME.match(name)
                if not layer or not isinstance(module, (nn.Linear, GPTQLinear)):
                    continue
                ckpt = key_of(name)
                if layer.group(2) in listed and name not in quantized:
                    raise GPTQFormatError(f"{ckpt}.qweight: missing from the checkpoint, but "
                                          f"quantization_config.modules_in_block_to_quantize lists {layer.group(2)!r}")
                if layer.group(2) not in listed and name in quantized:
                    raise GPTQFormatError(f"{ckpt}.qweight: the checkpoint quantizes {layer.group(2)!r}, which "
                                          "quantization_config.modules_in_block_to_quantize does not list")
        return quantized

    @staticmethod
    def _keeps_bias(files: Files, ckpt: str) -> bool:
        """Whether a quantized layer gets a bias: only one the checkpoint stores as a non-zero tensor. Qwen's GPTQ
        checkpoints are reported to carry all-zero `.bias` placeholders (on o_proj and the experts); a zero bias
        adds nothing, and dropping it lets the experts run on the 4-bit MoE kernels."""
        key = f"{ckpt}.bias"
        if key not in files:
            return False
        dtype, shape = files[key].dtype_shape(key)
        if not dtype.is_floating_point:
            return True  # refused by name when the layer is read
        return bool(torch.count_nonzero(files[key].read(key)).item())

    def load_layer(self, module: GPTQLinear, ckpt: str, files: Files, device: torch.device,
                   dtype: torch.dtype) -> Set[str]:
        """Check one quantized layer's tensors (shapes and dtypes from the headers before anything is read or a
        default g_idx is made; then values), and place them. Returns the checkpoint keys it consumed."""
        parts = [part for part in GPTQ_PARTS if f"{ckpt}.{part}" in files]
        source = os.path.basename(files[f"{ckpt}.qweight"].path)
        headers = {}
        for part in parts:
            file_dtype, shape = files[f"{ckpt}.{part}"].dtype_shape(f"{ckpt}.{part}")
            headers[part] = torch.empty(shape, dtype=file_dtype, device="meta")
        check_tensors(ckpt, headers, module.in_features, module.out_features, self.spec, source)
        tensors = {part: files[f"{ckpt}.{part}"].read(f"{ckpt}.{part}") for part in parts}
        if "g_idx" not in tensors:  # older checkpoints without act-order omit it
            tensors["g_idx"] = self.spec.group_of(module.in_features)
        check_tensors(ckpt, tensors, module.in_features, module.out_features, self.spec, source)
        if module.bias is None:
            tensors.pop("bias", None)  # an all-zero placeholder (see _keeps_bias)
        for part, tensor in tensors.items():
            setattr(module, part, tensor.to(device=device, dtype=dtype if part == "bias" else tensor.dtype))
        return {f"{ckpt}.{part}" for part in parts}

    def describe(self, path: str, count: int, dtype: torch.dtype) -> None:
        logger.info("qwen2_moe_hf: loaded GPTQ %d-bit checkpoint %s (%d quantized linears, compute dtype %s)",
                    self.spec.bits, path, count, dtype)


def hooks_for(raw: dict, source: str) -> GPTQHooks:
    return GPTQHooks(GPTQSpec.from_dict(raw, source))
