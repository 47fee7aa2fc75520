"""How a GPTQ checkpoint becomes our model: skeleton on the meta device, quantized Linears swapped for GPTQLinear,
then every tensor read from the safetensors shards straight into place (checked by name, shape and dtype).

Why our own loader rather than transformers' GPTQ quantizer: transformers 4.38 hands GPTQ to optimum/auto-gptq,
which would also wrap the router and shared_expert_gate, and transformers 5.x fuses experts into 3-D tensors and
drops the per-expert int4 tensors (the experts end up randomly initialised). Qwen2MoePreTrainedModel.from_pretrained
sends GPTQ checkpoints here, whatever GPTQ libraries are installed, so the quantizers never run for our model.

Memory: nothing full-precision is made for quantized layers; each tensor is read once into its final buffer
(checkpoint_io), so peak memory is about the model's size plus one tensor.
"""

import contextlib
import logging
import os
import re

import torch
from torch import nn

from .. import compat
from ..checkpoint_io import CheckpointError, key_mapping, read_json_object, weight_files
from .format import GPTQFormatError, GPTQSpec, check_tensors
from .linear import GPTQLinear

logger = logging.getLogger("qwen2_moe_hf")

QUANTIZE_CONFIG_FILE = "quantize_config.json"
HUB_KWARGS = ("revision", "token", "use_auth_token", "cache_dir", "local_files_only", "force_download", "proxies")
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
# Tensors older checkpoints carry that the model recomputes.
_IGNORED_EXTRA = re.compile(r".*rotary_emb\.inv_freq$")


def maybe_load_gptq(cls, pretrained, model_args, kwargs):
    """The model, if `pretrained` is a GPTQ checkpoint; None otherwise (then transformers' loader runs)."""
    if model_args:
        return None
    config = kwargs.get("config")
    if config is not None and not hasattr(config, "to_dict"):
        return None  # a config path: leave it to transformers
    path = str(pretrained)
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    subfolder = kwargs.get("subfolder") or ""
    settings = _gptq_settings(path, subfolder, config, hub)
    if settings is None:
        return None
    raw, source = settings
    spec = GPTQSpec.from_dict(raw, source)
    return load_gptq_model(cls, path, spec, dict(kwargs))


def _config_file(path, subfolder, name, hub):
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, name)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    try:
        return cached_file(path, name, subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                           **{k: v for k, v in hub.items() if k != "use_auth_token"})
    except Exception:
        return None


def _gptq_settings(path, subfolder, config, hub):
    """(GPTQ settings dict, where they came from) or None when the checkpoint is not GPTQ."""
    if config is None:
        config_file = _config_file(path, subfolder, "config.json", hub)
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
    legacy = _config_file(path, subfolder, QUANTIZE_CONFIG_FILE, hub)
    if legacy is not None:
        return read_json_object(legacy), QUANTIZE_CONFIG_FILE
    return None


def _local_folder(path, subfolder, hub):
    if os.path.isdir(path):
        return os.path.join(path, subfolder)
    from huggingface_hub import snapshot_download

    token = hub.get("token", hub.get("use_auth_token"))
    folder = snapshot_download(
        path, revision=hub.get("revision"), cache_dir=hub.get("cache_dir"), token=token,
        local_files_only=hub.get("local_files_only", False), force_download=hub.get("force_download", False),
        allow_patterns=[os.path.join(subfolder, p) for p in ("*.json", "*.safetensors", "*.txt", "*.model",
                                                              "*.jinja")],
    )
    return os.path.join(folder, subfolder)


def _resolve_fp_dtype(value, config):
    """transformers' rule: no dtype -> the default dtype (float32); "auto" -> the checkpoint's."""
    if value is None:
        return torch.get_default_dtype()
    if value == "auto":
        value = compat.config_dtype(config) or torch.float32
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch dtype or 'auto', got {value!r}")
    return value


def _resolve_dtype(value, config):
    if value is None or value == "auto":
        value = compat.config_dtype(config) or torch.float16
        if value == torch.float32 or value == "float32":
            value = torch.float16  # GPTQ scales are fp16; computing in the checkpoint's dtype is the default
    if isinstance(value, str):
        value = getattr(torch, value, None) if value.startswith(("float", "bfloat")) else None
    if value not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype: GPTQ models compute in float16, bfloat16 or float32, got {value!r}")
    return value


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_gptq_model(cls, pretrained, spec, kwargs):
    return _stream_load(cls, pretrained, spec, kwargs)


def load_full_precision(cls, pretrained, kwargs):
    """A full-precision checkpoint through the same streaming loader (each tensor read once into its final
    buffer): what transformers 4.x's loader does with about 1.6x the checkpoint's size in memory."""
    return _stream_load(cls, pretrained, None, kwargs)


def _stream_load(cls, pretrained, spec, kwargs):
    path = str(pretrained)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    subfolder = kwargs.pop("subfolder", "") or ""
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    attn_implementation = kwargs.pop("attn_implementation", None)
    allow_missing = kwargs.pop("allow_missing_weights", False)
    for ignored in ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "offload_folder",
                    "offload_state_dict", "_from_auto", "_from_pipeline", "_commit_hash", "quantization_config",
                    "key_mapping", "adapter_kwargs"):
        kwargs.pop(ignored, None)

    folder = _local_folder(path, subfolder, hub)
    if config is None:
        config, kwargs = cls.config_class.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    else:
        import copy

        config = copy.deepcopy(config)
        for key in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
    if kwargs:
        raise TypeError(f"from_pretrained: unexpected keyword arguments {sorted(kwargs)}")
    if attn_implementation is not None or spec is None:
        config._attn_implementation = attn_implementation or "sdpa"  # what transformers picks for this class
    dtype = _resolve_dtype(dtype, config) if spec is not None else _resolve_fp_dtype(dtype, config)

    files = weight_files(folder)
    with torch.device("meta"), _default_dtype(dtype):
        model = cls(config)
    key_of = key_mapping(model, files)
    quantized = _swap_quantized_linears(model, files, key_of, spec) if spec is not None else {}
    devices = _placement(model, device_map, max_memory, dtype)
    info = _load_tensors(model, files, key_of, quantized, spec, devices, dtype, allow_missing)
    _finish(model, folder, devices, device_map)
    if spec is None:
        compat.set_config_dtype(model.config, dtype)
    model.config._name_or_path = path
    if spec is not None:
        logger.info("qwen2_moe_hf: loaded GPTQ %d-bit checkpoint %s (%d quantized linears, compute dtype %s)",
                    spec.bits, path, len(quantized), dtype)
    return (model, info) if output_loading_info else model


def _swap_quantized_linears(model, files, key_of, spec):
    """Replace every nn.Linear the checkpoint stores as GPTQ (`<name>.qweight`) by a GPTQLinear on meta.
    Returns {module name: checkpoint prefix}."""
    quantized = {}
    per_layer = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        ckpt = key_of(name)
        layer = re.match(r"(?:.*\.)?layers\.(\d+)\.(.+)$", name)
        if layer:
            per_layer.setdefault(layer.group(2), set())
        if f"{ckpt}.qweight" not in files:
            continue
        scales_dtype = files[f"{ckpt}.scales"].dtype_shape(f"{ckpt}.scales")[0] if f"{ckpt}.scales" in files \
            else torch.float16
        replacement = GPTQLinear(module.in_features, module.out_features, f"{ckpt}.bias" in files, spec,
                                 device="meta", scales_dtype=scales_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        quantized[name] = ckpt
    listed = spec.modules_in_block_to_quantize
    if listed:
        unknown = sorted(listed - set(per_layer))
        if unknown:
            raise GPTQFormatError(f"quantization_config.modules_in_block_to_quantize: {unknown[:5]} name no Linear "
                                  f"in a decoder layer of this model (e.g. {sorted(per_layer)[:3]})")
        for name, module in model.named_modules():
            layer = re.match(r"(?:.*\.)?layers\.(\d+)\.(.+)$", name)
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


def _placement(model, device_map, max_memory, dtype):
    """{module name prefix: device} ("" = the whole model)."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, (int, torch.device)) or (
            isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")):
        return {"": torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)}
    if isinstance(device_map, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = model._no_split_modules
        if device_map != "sequential" and torch.cuda.is_available():
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    devices = {}
    for name, device in device_map.items():
        if device == "disk":
            raise ValueError(f"device_map puts {name or 'the model'!r} on disk: GPTQ layers cannot be offloaded to "
                             "disk; allow more memory (max_memory) or choose a smaller model")
        devices[name] = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return devices


def _device_of(name, devices):
    best = None
    for prefix in devices:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ValueError(f"device_map: no entry covers {name!r}")
    return devices[best]


def _load_tensors(model, files, key_of, quantized, spec, devices, dtype, allow_missing=False):
    loaded, expected = set(), {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        expected[key_of(name)] = name
    quantized_prefixes = set(quantized.values())
    # Quantized layers: all their tensors together, checked against each other before they are placed.
    for module_name, ckpt in quantized.items():
        module = model.get_submodule(module_name)
        parts = [part for part in GPTQ_PARTS if f"{ckpt}.{part}" in files]
        source = os.path.basename(files[f"{ckpt}.qweight"].path)
        # Shapes and dtypes from the headers first: nothing is read (or sized from the config) for a bad layer.
        headers = {}
        for part in parts:
            file_dtype, shape = files[f"{ckpt}.{part}"].dtype_shape(f"{ckpt}.{part}")
            headers[part] = torch.empty(shape, dtype=file_dtype, device="meta")
        check_tensors(ckpt, headers, module.in_features, module.out_features, spec, source)
        tensors = {part: files[f"{ckpt}.{part}"].read(f"{ckpt}.{part}") for part in parts}
        if "g_idx" not in tensors:  # older checkpoints without act-order omit it
            tensors["g_idx"] = spec.group_of(module.in_features)
        check_tensors(ckpt, tensors, module.in_features, module.out_features, spec, source)
        device = _device_of(module_name, devices)
        for part, tensor in tensors.items():
            if part == "bias":
                tensor = tensor.to(dtype)
            module._buffers[part] = tensor.to(device)
            loaded.add(f"{ckpt}.{part}")
    unexpected = []
    for key, handle in files.items():
        if key in loaded or key.rsplit(".", 1)[0] in quantized_prefixes:
            continue
        name = expected.get(key)
        if name is None:
            if not _IGNORED_EXTRA.match(key):
                unexpected.append(key)
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters.get(attr, module._buffers.get(attr))
        file_dtype, shape = handle.dtype_shape(key)
        if tuple(shape) != tuple(current.shape):
            raise CheckpointError(f"{os.path.basename(handle.path)}: tensor {key!r} has shape {list(shape)}, the "
                                  f"model (config.json) expects {list(current.shape)}")
        if not file_dtype.is_floating_point:
            raise CheckpointError(f"{os.path.basename(handle.path)}: tensor {key!r} has dtype {file_dtype}, "
                                  "expected a floating-point tensor")
        tensor = handle.read(key).to(device=_device_of(module_name, devices), dtype=dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad)
        else:
            module._buffers[attr] = tensor
        loaded.add(key)
    missing = _tie_or_fail(model, key_of, devices, dtype, allow_missing)
    if unexpected:
        logger.warning("qwen2_moe_hf: %d tensors in the checkpoint are not used by %s: %s%s", len(unexpected),
                       type(model).__name__, ", ".join(unexpected[:10]), " ..." if len(unexpected) > 10 else "")
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}


# The new head of a sequence classifier made from a language-model checkpoint: initialised, as transformers does.
_NEW_HEADS = ("score.",)


def _tie_or_fail(model, key_of, devices, dtype, allow_missing=False):
    """Tie lm_head to the embeddings when the config says so; initialise allowed missing tensors (a new head, or
    anything with allow_missing_weights=True); raise for any other tensor the checkpoint lacks. Returns the
    initialised names."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(model.config, "tie_word_embeddings", False):
        output.weight = model.get_input_embeddings().weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    fatal = [key_of(n) for n in missing if not (allow_missing or n.startswith(_NEW_HEADS))]
    if fatal:
        raise CheckpointError(f"{len(fatal)} tensors the model needs are missing from the checkpoint: "
                              f"{', '.join(fatal[:10])}{' ...' if len(fatal) > 10 else ''} (nothing is "
                              "initialised at random in their place; allow_missing_weights=True accepts that)")
    for name in missing:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        device = _device_of(module_name, devices)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(torch.empty(module._parameters[attr].shape, dtype=dtype,
                                                                device=device))
        else:
            module._buffers[attr] = torch.empty(module._buffers[attr].shape, dtype=dtype, device=device)
        model._init_weights(module)
    if missing:
        logger.warning("qwen2_moe_hf: initialised %d tensors the checkpoint lacks: %s", len(missing),
                       ", ".join(missing[:10]))
    return [key_of(n) for n in missing]


def _finish(model, folder, devices, device_map):
    model.eval()
    config_file = os.path.join(folder, "generation_config.json")
    if os.path.isfile(config_file) and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    distinct = {str(d) for d in devices.values()}
    if device_map is not None:
        model.hf_device_map = {name: (d.index if d.type == "cuda" else d.type) for name, d in devices.items()}
    if len(distinct) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=model.hf_device_map, offload_buffers=True)
