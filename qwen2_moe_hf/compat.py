"""Every difference between transformers 4.38 and 5.x that the package meets, in one place.

Nothing else in the package branches on the transformers version.
"""

import collections
import dataclasses
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

try:  # 5.x: transformers' RoPE variants (linear, dynamic, yarn, longrope, llama3, ...), read from rope_parameters
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as _HF_ROPE_INIT
except ImportError:  # 4.38 has none
    _HF_ROPE_INIT = None
if not IS_V5:  # 4.4x's functions read config.rope_scaling, which our config does not keep: ours, for both 4.x
    _HF_ROPE_INIT = None

try:  # 5.x: the attention-function registry and the masks each implementation wants
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # 4.38: neither; the model builds its own boolean mask and picks its own function
    ALL_ATTENTION_FUNCTIONS = create_causal_mask = create_sliding_window_causal_mask = None

try:  # 5.x: a DynamicCache is a list of layers, each concatenating its keys and values per step
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # 4.38: key / value lists inside the cache
    _DynamicLayer = None

__all__ = ["Cache", "DynamicCache", "GradientCheckpointingLayer"]

# Whether decode steps on CPU let their DynamicCache layers append in place (AppendingLayer); False: transformers'
# torch.cat per step (benchmarks' A/B, tests).
APPEND_KV_IN_PLACE = True
# Positions an AppendingLayer reserves beyond what it holds when it takes a new buffer (at least; half its length
# when longer): the buffer is copied once per growth, not once per step.
KV_SPARE = 256


def _prefix_of(t: Optional[torch.Tensor], buf: Optional[torch.Tensor]) -> bool:
    """Whether t is buf[:, :, :n] (same storage start, strides, batch, heads and head size)."""
    return (buf is not None and t is not None and t.dim() == 4 and t.data_ptr() == buf.data_ptr()
            and t.stride() == buf.stride() and t.shape[:2] == buf.shape[:2] and t.shape[3] == buf.shape[3]
            and t.dtype == buf.dtype and t.device == buf.device)


if _DynamicLayer is not None:
    class AppendingLayer(_DynamicLayer):
        """transformers' DynamicLayer, but a step's keys and values are written into spare room of a larger buffer
        instead of `torch.cat` of the whole cache (a copy of everything cached, per layer and step: at 1024 cached
        positions 16 MB of memory traffic per layer and token). `keys` / `values` stay views of the buffer's first
        positions. A view that is no longer such a prefix (beam reordering, batch selection, offloading, reset) or is
        shorter than what was written (crop) makes the next update copy into a new buffer, so no tensor handed out
        earlier is ever written over."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            step = key_states.shape[-2]
            kbuf, vbuf, held = self.reserve(key_states.shape, value_states.shape, key_states.dtype,
                                            key_states.device)
            kbuf.narrow(2, held, step).copy_(key_states)
            vbuf.narrow(2, held, step).copy_(value_states)
            return self.commit(held + step)

        def reserve(self, key_shape: Sequence[int], value_shape: Sequence[int], dtype: torch.dtype,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, int]:
            """(key buffer, value buffer, positions held): buffers whose first `held` positions hold this layer's
            keys and values, with room after them for a step of key_shape / value_shape ([batch, heads, step,
            head_dim]) in dtype on device. The caller writes the step there, then commits."""
            keys, values = self.keys, self.values
            state = self.__dict__
            kbuf, vbuf = state.get("_kbuf"), state.get("_vbuf")
            held = keys.shape[-2] if keys.dim() == 4 else 0
            need = held + key_shape[2]
            # The views handed out last step, untouched (the same objects over the same memory), are a prefix of
            # the buffers by construction: the per-step check is identity, the full one only for anything else.
            ours = (keys is state.get("_kview") and values is state.get("_vview")
                    and keys.data_ptr() == kbuf.data_ptr() and values.data_ptr() == vbuf.data_ptr())
            same = held == state.get("_written", -1) and (
                ours or _prefix_of(keys, kbuf) and _prefix_of(values, vbuf))
            if not (same and need <= kbuf.shape[-2] and _fits(key_shape, dtype, device, kbuf)
                    and _fits(value_shape, dtype, device, vbuf)):
                room = need + max(KV_SPARE, need // 2)
                kbuf = torch.empty(*key_shape[:2], room, key_shape[3], dtype=dtype, device=device)
                vbuf = torch.empty(*value_shape[:2], room, value_shape[3], dtype=dtype, device=device)
                if held:
                    kbuf.narrow(2, 0, held).copy_(keys)
                    vbuf.narrow(2, 0, held).copy_(values)
                self._kbuf, self._vbuf = kbuf, vbuf
            return kbuf, vbuf, held

        def commit(self, need: int, keys: Optional[torch.Tensor] = None,
                   values: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
            """The buffers' first `need` positions (written by update or by the caller of reserve) become this
            layer's keys and values: the views `keys` / `values` where the caller made them (the decode lane's
            extension call: buffer[:, :, :need]), else made here."""
            self.keys = self._kview = self._kbuf.narrow(2, 0, need) if keys is None else keys
            self.values = self._vview = self._vbuf.narrow(2, 0, need) if values is None else values
            self._written = need
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = self._kview = self._vview = None
            super().reset()

    def _fits(shape: Sequence[int], dtype: torch.dtype, device: torch.device, buf: torch.Tensor) -> bool:
        """Whether a step of this shape (batch, heads, head size), dtype and device goes into buf."""
        return (len(shape) == 4 and dtype == buf.dtype and tuple(shape[:2]) == tuple(buf.shape[:2])
                and shape[3] == buf.shape[3] and (device.type == "cpu" and buf.is_cpu or device == buf.device))
else:
    AppendingLayer = None


_OUTPUT_FIELDS: Dict[type, Tuple[Tuple[Tuple[str, Any], ...], frozenset]] = {}


def model_output(cls: type, **values: Any) -> Any:
    """cls(**values) for a transformers ModelOutput dataclass, built as its constructor builds it (each field an
    attribute, the fields that are not None its items, in field order) without its per-field checks: the
    constructor's __setattr__ reads dataclasses.fields() once per field, ~60-90 us an output with caches cold, as
    they are after a decode step's weights (docs/benchmarks.md). The class's first output goes through its own
    constructor (it registers the class and checks it), and so does any output the constructor would treat apart (a
    first field that is not a tensor with every other field None: it unpacks that one)."""
    known = _OUTPUT_FIELDS.get(cls)
    fields = known[0] if known is not None else ()
    if (known is None or not values.keys() <= known[1]  # unknown names: the constructor's TypeError
            or not torch.is_tensor(values.get(fields[0][0])) and all(values.get(n) is None for n, _ in fields[1:])):
        out = cls(**values)
        if known is None:
            fields = tuple((f.name, None if f.default is dataclasses.MISSING else f.default)
                           for f in dataclasses.fields(cls))
            _OUTPUT_FIELDS[cls] = (fields, frozenset(name for name, _ in fields))
        return out
    out = cls.__new__(cls)
    dict_init, dict_set, set_attr = _ORDERED_DICT_INIT, _ORDERED_DICT_SET, object.__setattr__
    dict_init(out)
    for name, default in fields:
        value = values.get(name, default)
        set_attr(out, name, value)
        if value is not None:
            dict_set(out, name, value)
    return out


_ORDERED_DICT_INIT = collections.OrderedDict.__init__
_ORDERED_DICT_SET = collections.OrderedDict.__setitem__


def append_kv_in_place(cache: Optional[Cache], layer_idx: int, key: torch.Tensor) -> None:
    """Let layer `layer_idx` of a 5.x DynamicCache on CPU append in place (AppendingLayer) from its next update on:
    the layer object keeps its state and class hierarchy, only `update` differs. Other caches, devices, 4.x and
    torch.compile keep transformers' own behaviour."""
    if AppendingLayer is None or not APPEND_KV_IN_PLACE or key.device.type != "cpu":
        return
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and type(layers[layer_idx]) is _DynamicLayer:
        layers[layer_idx].__class__ = AppendingLayer


def decode_kv_layer(cache: Optional[Cache], layer_idx: int) -> Any:
    """The cache layer whose buffers a whole-layer decode step writes into (moe/decode_layer.py): an AppendingLayer
    of a plain 5.x DynamicCache that already holds this layer's states; None for anything else (other caches,
    offloading, 4.x, a layer not yet filled), where the step goes through cache.update."""
    if (AppendingLayer is None or not APPEND_KV_IN_PLACE or type(cache) is not DynamicCache
            or getattr(cache, "offloading", False)):
        return None
    layers = cache.layers
    if layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) not in (_DynamicLayer, AppendingLayer) or not layer.is_initialized or not layer.keys.is_cpu:
        return None
    layer.__class__ = AppendingLayer  # as append_kv_in_place: CPU layers append in place
    return layer


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


# What a decode step of transformers 5.x's generate hands GenerationMixin.prepare_inputs_for_generation in the
# common case (greedy or sampling, no token types, a cache that is not compileable).
_DECODE_STEP_ARGS = frozenset(("next_sequence_length", "past_key_values", "attention_mask", "position_ids",
                               "logits_to_keep", "use_cache"))


def decode_step_inputs(model: torch.nn.Module, input_ids: torch.Tensor,
                       kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What 5.x's GenerationMixin.prepare_inputs_for_generation returns for a decode step of a decoder-only model in
    the common case: the last token (a contiguous copy), the cache, the last position (a contiguous copy), the
    attention mask and the remaining arguments as given. None where it is not that case (a prompt, token types,
    input embeddings, a compileable cache, inputs on another device than the model's, remote code, transformers
    4.x's arguments): the generic one runs. Why: with caches cold after a step's weights, its general code cost
    ~0.13-0.17 ms a token (docs/benchmarks.md); this is the same dict, built with the few operations it needs."""
    if kwargs.get("next_sequence_length") != 1 or not kwargs.keys() <= _DECODE_STEP_ARGS:
        return None
    cache, mask, positions = kwargs.get("past_key_values"), kwargs.get("attention_mask"), kwargs.get("position_ids")
    if (not isinstance(cache, Cache) or cache.is_compileable or type(input_ids) is not torch.Tensor
            or input_ids.dim() != 2 or model.config.is_encoder_decoder or model._auto_class is not None
            or input_ids.device != model.device):
        return None
    inputs = {"input_ids": input_ids[:, -1:].clone(memory_format=torch.contiguous_format), "past_key_values": cache}
    if positions is not None:
        inputs["position_ids"] = (positions if positions.shape[-1] == 1
                                  else positions[..., -1:].clone(memory_format=torch.contiguous_format))
    if mask is not None:
        inputs["attention_mask"] = mask
    for key in ("logits_to_keep", "use_cache"):
        if key in kwargs:
            inputs[key] = kwargs[key]
    return inputs


def next_step_kwargs(outputs: Any, model_kwargs: Dict[str, Any], is_encoder_decoder: bool = False,
                     num_new_tokens: int = 1, **other: Any) -> Optional[Dict[str, Any]]:
    """What 5.x's GenerationMixin._update_model_kwargs_for_generation makes of model_kwargs after a step of one new
    token in the common case (a decoder-only model whose output holds past_key_values, no token types): the cache
    taken from the output, the positions and the 2-D attention mask grown by one. model_kwargs is updated in place
    and returned, as there; None where it is not that case (the generic one runs). Why: as decode_step_inputs."""
    if (other or is_encoder_decoder or num_new_tokens != 1 or "cache_position" in model_kwargs
            or model_kwargs.get("token_type_ids") is not None
            or model_kwargs.get("mm_token_type_ids") is not None or "past_key_values" not in outputs):
        return None
    model_kwargs["past_key_values"] = outputs["past_key_values"]
    positions = model_kwargs.get("position_ids")
    if positions is not None:
        model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return model_kwargs


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


class _TransformersVerbosity(logging.Filter):
    """Drops our records below transformers' verbosity when the user made transformers quieter than WARNING
    (`transformers.logging.set_verbosity_error()`, TRANSFORMERS_VERBOSITY=error): one switch silences both."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = transformers.utils.logging.get_verbosity()
        return quiet <= logging.WARNING or record.levelno >= quiet


def plugin_logger() -> logging.Logger:
    """The "qwen2_moe_hf" logger every module of ours writes to, following transformers' verbosity."""
    logger = logging.getLogger("qwen2_moe_hf")
    if not any(isinstance(f, _TransformersVerbosity) for f in logger.filters):
        logger.addFilter(_TransformersVerbosity())
    return logger


def transformers_loading_logger() -> logging.Logger:
    """The logger transformers' from_pretrained warns on (newly initialised and mismatched weights)."""
    return transformers.utils.logging.get_logger("transformers.modeling_utils")


def _default_inv_freq(theta: float, dim: int, device: Optional[torch.device]) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _linear_rope(config: Any, device: Optional[torch.device] = None, seq_len: Optional[int] = None,
                 **_: Any) -> Tuple[torch.Tensor, float]:
    """Positions divided by `factor` (4.38's LlamaLinearScalingRotaryEmbedding)."""
    rope = config.rope_parameters
    return _default_inv_freq(rope["rope_theta"], config.head_dim, device) / rope["factor"], 1.0


def _dynamic_rope(config: Any, device: Optional[torch.device] = None, seq_len: Optional[int] = None,
                  **_: Any) -> Tuple[torch.Tensor, float]:
    """NTK-aware base growing with the sequence past max_position_embeddings (4.38's
    LlamaDynamicNTKScalingRotaryEmbedding)."""
    rope, dim, trained = config.rope_parameters, config.head_dim, config.max_position_embeddings
    seq_len = max(seq_len or trained, trained)
    factor = rope["factor"]
    base = rope["rope_theta"] * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim, device), 1.0


# rope_type -> fn(config, device, seq_len=None) -> (inv_freq, attention scaling); "default" is the model's own.
ROPE_INIT_FUNCTIONS = dict(_HF_ROPE_INIT) if _HF_ROPE_INIT is not None else {"linear": _linear_rope,
                                                                              "dynamic": _dynamic_rope}
ROPE_TYPES = ("default",) + tuple(ROPE_INIT_FUNCTIONS)


def rope_frequencies(config: Any, position_ids: torch.Tensor,
                     device: Optional[torch.device]) -> Tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, attention scaling) for the config's rope_type at these positions.

    Matches transformers' rotary embedding with its dynamic update: "dynamic" recomputes for the longest position
    past max_position_embeddings, "longrope" switches to its long factors past original_max_position_embeddings.
    Computed from the positions of this call only, never from earlier calls (transformers keeps the largest length
    seen until a call falls back within the trained length; the two agree on single calls and on generate)."""
    rope = config.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return _default_inv_freq(rope["rope_theta"], config.head_dim, device), 1.0
    init = ROPE_INIT_FUNCTIONS[rope_type]
    # The dynamic types need the longest position: one host sync, as transformers' update does.
    seq_len = int(position_ids.max()) + 1 if rope_type in ("dynamic", "longrope") else 0
    if rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        inv_freq, scaling = init(config, device, seq_len=seq_len)
    else:
        inv_freq, scaling = init(config, device)
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        if rope_type == "longrope" and seq_len > original:
            inv_freq = init(config, device, seq_len=original + 1)[0]  # the long factors; scaling stays the short one's
    return inv_freq.to(device=device, dtype=torch.float32), float(scaling)


def attention_masks(config: Any, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    past_key_values: Optional[Cache], position_ids: torch.Tensor) -> Optional[Dict[str, Any]]:
    """{layer type: mask} in the form config._attn_implementation needs, from transformers 5.x's mask builders;
    None on 4.x (the model builds its boolean masks itself)."""
    if create_causal_mask is None:
        return None
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  past_key_values=past_key_values, position_ids=position_ids)
    kinds = set(config.layer_types)
    return {kind: (create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask)(**kwargs)
            for kind in kinds}
