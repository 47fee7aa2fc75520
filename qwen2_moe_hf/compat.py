"""Every difference between transformers 4.38 and 5.x that the package meets, in one place.

Nothing else in the package branches on the transformers version.
"""

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import transformers
from packaging import version
from transformers.cache_utils import Cache, DynamicCache

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
IS_V5 = TRANSFORMERS_VERSION.major >= 5
# 4.38/4.39 know nothing of qwen2_moe; 4.40+ ship their own (which registration may replace).
HAS_BUILTIN_QWEN2_MOE = TRANSFORMERS_VERSION >= version.parse("4.40.0")
# transformers >= 4.45 ships a generic `prepare_inputs_for_generation` in GenerationMixin; older ones leave it to
# every model.
HAS_GENERIC_PREPARE_INPUTS = TRANSFORMERS_VERSION >= version.parse("4.45.0")

try:  # 5.x: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _hf_init
except ImportError:  # 4.x
    _hf_init = None

try:  # 5.x: decoder layers checkpoint themselves when gradient checkpointing is on
    from transformers.modeling_layers import GradientCheckpointingLayer
    HAS_CHECKPOINTING_LAYER = True
except ImportError:  # 4.x: the model's layer loop calls model._gradient_checkpointing_func
    GradientCheckpointingLayer = torch.nn.Module
    HAS_CHECKPOINTING_LAYER = False

__all__ = ["Cache", "DynamicCache", "GradientCheckpointingLayer"]


def config_base_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs for PretrainedConfig.__init__: the dtype key each version understands."""
    kwargs = dict(kwargs)
    if not IS_V5 and "dtype" in kwargs:
        dtype = kwargs.pop("dtype")
        kwargs.setdefault("torch_dtype", dtype)
    return kwargs


def dtype_kwarg(dtype: Union[torch.dtype, str]) -> Dict[str, Union[torch.dtype, str]]:
    """from_pretrained's dtype keyword: `dtype` on 5.x, `torch_dtype` before."""
    return {"dtype": dtype} if IS_V5 else {"torch_dtype": dtype}


def config_dtype(config: transformers.PretrainedConfig) -> Optional[Union[torch.dtype, str]]:
    return getattr(config, "dtype", None) if IS_V5 else getattr(config, "torch_dtype", None)


def set_config_dtype(config: transformers.PretrainedConfig, dtype: torch.dtype) -> None:
    """Record the dtype a model was loaded in, under the key this version's configs use."""
    if IS_V5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def init_normal_(tensor: torch.Tensor, std: float) -> None:
    if _hf_init is not None:
        _hf_init.normal_(tensor, mean=0.0, std=std)
    else:
        with torch.no_grad():
            tensor.normal_(mean=0.0, std=std)


def init_zeros_(tensor: torch.Tensor) -> None:
    if _hf_init is not None:
        _hf_init.zeros_(tensor)
    else:
        with torch.no_grad():
            tensor.zero_()


def init_ones_(tensor: torch.Tensor) -> None:
    if _hf_init is not None:
        _hf_init.ones_(tensor)
    else:
        with torch.no_grad():
            tensor.fill_(1.0)


def as_cache(
    past_key_values: Optional[Union[Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]],
) -> Optional[Cache]:
    """A Cache object from what callers pass: None, a Cache, or (4.x) the legacy tuple of (key, value) per layer."""
    if past_key_values is None or isinstance(past_key_values, Cache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        cache = DynamicCache()
        for layer_idx, (key, value) in enumerate(past_key_values):
            cache.update(key, value, layer_idx)
        return cache
    raise TypeError(
        f"past_key_values: expected a transformers Cache or a tuple of (key, value), got {type(past_key_values)}"
    )


def prepare_inputs_for_generation(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    past_key_values: Optional[Union[Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    cache_position: Optional[torch.LongTensor] = None,
    use_cache: Optional[bool] = True,
    **kwargs: Any,
) -> Dict[str, Any]:
    """GenerationMixin.prepare_inputs_for_generation for transformers < 4.45, which leave it to each model.

    Feeds only the tokens the cache has not seen, with padding-aware position ids (left padding).
    """
    past_length = 0
    if past_key_values is not None:
        past_key_values = as_cache(past_key_values)
        past_length = past_key_values.get_seq_length()
        if past_length > 0:
            input_ids = input_ids[:, past_length:]
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None and position_ids is None:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        position_ids = position_ids[:, -input_ids.shape[1]:]
    if inputs_embeds is not None and past_length == 0:
        model_inputs = {"inputs_embeds": inputs_embeds}
    else:
        model_inputs = {"input_ids": input_ids.contiguous()}
    model_inputs.update(
        {
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "attention_mask": attention_mask,
        }
    )
    return model_inputs


def transformers_loading_logger() -> logging.Logger:
    """The logger transformers' from_pretrained warns on (newly initialised and mismatched weights)."""
    return transformers.utils.logging.get_logger("transformers.modeling_utils")
