"""PEFT LoRA on GPTQ-Int4 layers (attention, routed and shared experts of a GPTQ checkpoint).

PEFT wraps the layer types it knows; our GPTQLinear is not one of them, so a plain `LoraConfig` stops at it with
"Target module ... is not supported". PEFT (0.12 and newer) lets a config name a LoRA layer class for a custom layer
type; `lora_config()` returns a LoraConfig that maps GPTQLinear to PEFT's own GPTQ LoRA layer (the one it uses for
AutoGPTQ / GPTQModel layers: the frozen int4 layer's output plus the adapters' B·A·x). Full-precision layers keep
PEFT's usual LoRA layers.

    from qwen2_moe_hf.lora import lora_config
    model = get_peft_model(gptq_model, lora_config(r=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    ...
    PeftModel.from_pretrained(gptq_model, adapter_dir, config=lora_config(adapter_dir))   # reload

What runs: the wrapped int4 layers compute with our int4 CPU / Triton kernels when no gradient flows into their
input (inference), and with the dequantized reference while training. A MoE block whose experts are LoRA-wrapped
runs its experts one by one (the torch backend), since the fused backends read the experts' weights, not their
modules. Adapters cannot be merged into int4 weights (`merge_and_unload` raises): serve them unmerged, or merge them
into the full-precision checkpoint and quantize again.
"""

import functools
import os
from typing import Any, Union

from .gptq.linear import GPTQLinear

# PEFT's custom-layer dispatch (LoraConfig._register_custom_module) arrived in 0.12.0.
PEFT_CUSTOM_LAYERS_VERSION = "0.12.0"


def lora_config(path: Union[str, os.PathLike, None] = None, **kwargs: Any) -> Any:
    """A peft.LoraConfig (from `kwargs`, or from the saved adapter folder `path`) that also wraps GPTQLinear layers."""
    import peft

    if path is not None:
        if kwargs:
            raise TypeError("lora_config: give either an adapter folder or LoraConfig arguments, not both")
        config = peft.LoraConfig.from_pretrained(str(path))
    else:
        config = peft.LoraConfig(**kwargs)
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise RuntimeError(f"LoRA on GPTQ layers needs peft >= {PEFT_CUSTOM_LAYERS_VERSION} (custom layer dispatch); "
                           f"peft {peft.__version__} is installed: pip install -U peft. LoRA on full-precision "
                           "checkpoints works with this peft and a plain LoraConfig.")
    register({GPTQLinear: _gptq_lora_layer()})
    return config


@functools.lru_cache(maxsize=None)  # one class, so that isinstance holds across configs
def _gptq_lora_layer() -> type:
    """PEFT's GPTQ LoRA layer, with a merge that says why it cannot (PEFT's raises a bare NotImplementedError)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    class GPTQLinearLora(GPTQLoraLinear):
        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError(
                f"LoRA adapters cannot be merged into int4 GPTQ weights ({self.get_base_layer()}): keep them unmerged "
                "(PeftModel serves them as they are), or merge them into the full-precision checkpoint and run "
                "`qwen2-moe-hf quantize` again")

    return GPTQLinearLora
