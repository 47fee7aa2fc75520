"""The load plan: how `from_pretrained` turns a checkpoint into our model, in one place.

    config.json checked (files.read_config_json)
    quantized (GPTQ, recognised by gptq.hooks)     -> the streaming loader with GPTQ's hooks
    full precision, transformers 4.x, CPU placement -> the streaming loader
    anything else                                  -> transformers' own loader, with our checks around it

The streaming loader builds the model on the meta device (a quantization's hooks swap its quantized Linears
there), places modules by device_map, and reads every tensor from the safetensors shards straight into place, each
checked by name, shape and dtype; a quantized layer is read by its hooks. Nothing full-precision is made for a
quantized layer, and each tensor is read once into its final buffer, so peak memory is about the model's size plus
one tensor (transformers 4.38's loader held a shard's memory map beside its copies: 1.6x the checkpoint).

Strict in both, where transformers is not: a tensor of the checkpoint's own architecture that the checkpoint lacks
(a missing expert, a truncated shard) raises, where transformers would initialise it at random with a warning.
What transformers defines as legitimate loads as it does there, with its warning: a head the checkpoint never had
(a causal LM or classifier from a base model's or another head's checkpoint: every tensor outside the base model's
prefix, unless config.json's `architectures` says the checkpoint was saved by this very class), a tensor of another
shape when the caller passed ignore_mismatched_sizes=True (re-initialised), and anything missing when the caller
asked for output_loading_info=True (reported in the info) or passed allow_missing_weights=True.
"""

import contextlib
import copy
import logging
import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Type, Union

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from huggingface_hub import snapshot_download
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PretrainedConfig
from transformers.utils import cached_file, logging as hf_logging

from .. import compat
from ..files import CONFIG_FILE, CheckpointError, SafetensorsFile, read_config_json, weight_files
from ..gptq import hooks as gptq_hooks
from ..gptq import linear as gptq_linear

logger = logging.getLogger("qwen2_moe_hf")

HUB_KWARGS = ("revision", "token", "use_auth_token", "cache_dir", "local_files_only", "force_download", "proxies")
# Tensors a checkpoint may lack without harm: recomputed buffers.
_MAY_BE_MISSING = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
_IGNORED_EXTRA = re.compile(r".*rotary_emb\.(original_)?inv_freq$")
# Arguments only transformers' own loader handles: with any of them, it does the loading.
_TRANSFORMERS_ONLY = ("offload_folder", "offload_state_dict", "quantization_config", "load_in_8bit", "load_in_4bit",
                      "ignore_mismatched_sizes", "from_tf", "from_flax", "gguf_file", "state_dict", "variant",
                      "adapter_kwargs", "key_mapping", "tp_plan", "device_mesh")
# transformers 5.x's tensor-parallel arguments (its loader shards full-precision checkpoints as it reads them).
_DISTRIBUTED = ("tp_plan", "tp_size", "distributed_config", "device_mesh")


def from_pretrained(cls: Type[nn.Module], transformers_load: Callable, pretrained: Union[str, os.PathLike],
                    model_args: tuple, kwargs: Dict[str, Any]) -> Union[nn.Module, Tuple[nn.Module, Dict[str, list]]]:
    """The model class `cls` from `pretrained` (a folder or a hub id), by the plan above. `transformers_load` is
    transformers' own from_pretrained for cls."""
    folder = os.path.join(str(pretrained), kwargs.get("subfolder") or "")
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        read_config_json(folder)  # untrusted: not a JSON object, or a key given twice, raises naming the file
    quantization = _quantization(str(pretrained), kwargs) if not model_args else None
    _check_distributed(kwargs, quantization)
    if quantization is not None:
        return _stream_load(cls, pretrained, kwargs, quantization)
    return _checked_transformers_load(cls, transformers_load, pretrained, model_args, kwargs)


def _check_distributed(kwargs: Dict[str, Any], quantization: Optional[gptq_hooks.GPTQHooks]) -> None:
    """Tensor parallelism (`tp_plan` and friends) is transformers 5.x's loader's, for full-precision checkpoints:
    anywhere else, an error naming the argument (4.38 would fail on an unexpected keyword in the model's __init__,
    the streaming loader on an unknown argument). Pipeline stages (pp_size > 1) are refused on every stack."""
    asked = [k for k in _DISTRIBUTED if kwargs.get(k) is not None]
    if not asked:
        return
    config = kwargs.get("distributed_config")
    stages = config.get("pp_size") if isinstance(config, dict) else getattr(config, "pp_size", None)
    if isinstance(stages, int) and stages > 1:
        raise ValueError(f"from_pretrained(distributed_config=...): pp_size={stages}: pipeline parallelism is not "
                         "supported (transformers' pipeline stages replace the decoder layers a stage does not own "
                         "by identities that return a tensor, where ours return (hidden states, attention weights, "
                         "router logits)); use tp_size, or device_map to spread the layers over devices "
                         "(docs/devices.md)")
    if not compat.IS_V5:
        raise ValueError(f"from_pretrained({asked[0]}=...): tensor parallelism needs transformers 5.x (installed: "
                         f"{compat.TRANSFORMERS_VERSION}); load the model in one process, with device_map to spread "
                         "it over devices (docs/devices.md)")
    if quantization is not None:
        raise ValueError(f"from_pretrained({asked[0]}=...): GPTQ checkpoints load through qwen2_moe_hf's own loader, "
                         "which does not shard across processes; load the model in one process (device_map), or "
                         "serve it with vLLM or SGLang for tensor parallelism (docs/devices.md)")


# ---------------------------------------------------------------------------------------------------------------
# Finding the files


def _config_file(path: str, subfolder: str, name: str, hub: Dict[str, Any]) -> Optional[str]:
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, name)
        return candidate if os.path.isfile(candidate) else None
    try:
        return cached_file(path, name, subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                           **{k: v for k, v in hub.items() if k != "use_auth_token"})
    except Exception:
        return None


def _local_folder(path: str, subfolder: str, hub: Dict[str, Any]) -> str:
    if os.path.isdir(path):
        return os.path.join(path, subfolder)
    token = hub.get("token", hub.get("use_auth_token"))
    folder = snapshot_download(
        path, revision=hub.get("revision"), cache_dir=hub.get("cache_dir"), token=token,
        local_files_only=hub.get("local_files_only", False), force_download=hub.get("force_download", False),
        allow_patterns=[os.path.join(subfolder, p)
                        for p in ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")],
    )
    return os.path.join(folder, subfolder)


def _quantization(path: str, kwargs: Dict[str, Any]) -> Optional[gptq_hooks.GPTQHooks]:
    """GPTQ's hooks when the checkpoint (or the config passed in) is GPTQ, else None."""
    config = kwargs.get("config")
    if config is not None and not hasattr(config, "to_dict"):
        return None  # a config path: leave it to transformers
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    subfolder = kwargs.get("subfolder") or ""
    config_file = _config_file(path, subfolder, CONFIG_FILE, hub) if config is None else None
    legacy = _config_file(path, subfolder, gptq_hooks.QUANTIZE_CONFIG_FILE, hub)
    found = gptq_hooks.settings(config_file, legacy, config)
    return gptq_hooks.hooks_for(*found) if found is not None else None


# ---------------------------------------------------------------------------------------------------------------
# transformers' loader, with our checks around it


def key_mapping(model: nn.Module, checkpoint_keys: Iterable[str]) -> Callable[[str], str]:
    """model tensor name -> checkpoint tensor name (a base model and a *ForCausalLM differ by the "model." prefix)."""
    prefix = model.base_model_prefix
    has_base = isinstance(getattr(model, prefix, None), torch.nn.Module)
    ckpt_prefixed = any(k.startswith(prefix + ".") for k in checkpoint_keys)
    if has_base and not ckpt_prefixed:
        return lambda name: name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
    if not has_base and ckpt_prefixed:
        return lambda name: f"{prefix}.{name}"
    return lambda name: name


def new_head(model: nn.Module, name: str) -> bool:
    """Whether the model tensor `name` belongs to a head the checkpoint never had: it lies outside the base model
    (a causal LM's `lm_head`, a classifier's `score`, a QA model's `qa_outputs`), and the checkpoint's config does
    not name this class among its `architectures` (a checkpoint saved by this class that lacks its head is
    truncated, not headless)."""
    prefix = model.base_model_prefix
    if not isinstance(getattr(model, prefix, None), nn.Module) or name.startswith(prefix + "."):
        return False
    return type(model).__name__ not in (getattr(model.config, "architectures", None) or [])


def _new_head_warning(model: nn.Module, path: str, names: Iterable[str]) -> None:
    # transformers 4.x's words for the same event (5.x prints its load report instead), on its logger, so callers
    # that filter or capture transformers' loading warnings see this one too.
    compat.transformers_loading_logger().warning(
        f"Some weights of {type(model).__name__} were not initialized from the model checkpoint at {path} and are "
        f"newly initialized: {sorted(names)}\nYou should probably TRAIN this model on a down-stream task to be able "
        "to use it for predictions and inference.")


def check_against_model(cls: Type[nn.Module], config: PretrainedConfig,
                        files: Mapping[str, SafetensorsFile]) -> None:
    """Every checkpoint tensor the model uses has the shape the config gives it and a floating dtype; raises
    CheckpointError naming the file and tensor. Costs one model skeleton on the meta device."""
    with torch.device("meta"):
        skeleton = cls(config)
    key_of = key_mapping(skeleton, files)
    for name, tensor in list(skeleton.named_parameters()) + list(skeleton.named_buffers()):
        key = key_of(name)
        handle = files.get(key)
        if handle is None:
            continue  # missing tensors are reported after loading
        dtype, shape = handle.dtype_shape(key)
        where = os.path.basename(handle.path)
        if tuple(shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)}, the config expects "
                                  f"{list(tensor.shape)}")
        if tensor.is_floating_point() and not dtype.is_floating_point:
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {dtype}, expected a floating-point tensor")


def _streamable(kwargs: Dict[str, Any]) -> bool:
    """Whether the streaming loader takes this full-precision checkpoint: on transformers 4.x, whose loader holds a
    shard's memory map and its copies at once, for CPU placement. transformers 5.x maps weights lazily: it keeps
    them."""
    if compat.IS_V5 or any(kwargs.get(k) for k in _TRANSFORMERS_ONLY):
        return False
    return kwargs.get("device_map") in (None, "cpu") and kwargs.get("max_memory") is None


def _checked_transformers_load(cls, load: Callable, pretrained, model_args: tuple, kwargs: Dict[str, Any]):
    """Full precision: a local folder's shards are checked first (headers, sizes, the index, each tensor's shape and
    dtype against the config); only safetensors are read unless use_safetensors=False (then transformers reads .bin
    with torch.load(weights_only=True)); missing or mismatched tensors raise as the module docstring says."""
    kwargs = dict(kwargs)
    allow_missing = kwargs.pop("allow_missing_weights", False)
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("use_safetensors", True)
    folder = os.path.join(str(pretrained), kwargs.get("subfolder") or "")
    if os.path.isdir(folder) and kwargs["use_safetensors"] is not False:
        if _streamable(kwargs) and not model_args:
            return _stream_load(cls, pretrained, dict(kwargs, allow_missing_weights=allow_missing,
                                                      output_loading_info=want_info), None)
        files = weight_files(folder)
        if not kwargs.get("ignore_mismatched_sizes") and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            config = kwargs.get("config")
            if not hasattr(config, "to_dict"):
                # with the config fields passed as keywords (num_labels=42), as transformers will build it
                defaults = cls.config_class()
                fields = {k: v for k, v in kwargs.items() if hasattr(defaults, k) and k not in ("dtype", "torch_dtype")}
                config = cls.config_class.from_pretrained(folder, **fields)
            check_against_model(cls, config, files)
    model, info = load(pretrained, *model_args, output_loading_info=True, **kwargs)
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched and not kwargs.get("ignore_mismatched_sizes"):
        # transformers 5.x re-initialises these at random (with a warning); a shape the config does not expect is
        # a corrupt or mismatched checkpoint.
        described = [f"{m[0]} (checkpoint {list(m[1])}, model {list(m[2])})" if isinstance(m, (tuple, list))
                     and len(m) == 3 else str(m) for m in mismatched]
        raise CheckpointError(f"{pretrained}: tensors whose shape does not match the config: "
                              f"{', '.join(described[:10])}{' ...' if len(described) > 10 else ''}")
    config = model.config
    # transformers has initialised what is missing, and warned; only a hole in the checkpoint's own architecture is
    # an error here, unless the caller asked to see the loading info or to accept holes.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(_MAY_BE_MISSING)
               and not new_head(model, k)
               and not (getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight"))]
    if missing and not (allow_missing or want_info):
        raise CheckpointError(
            f"{len(missing)} tensors the model needs are missing from the checkpoint {pretrained}: "
            f"{', '.join(sorted(missing)[:10])}{' ...' if len(missing) > 10 else ''}. Nothing is initialised at "
            "random in their place; pass allow_missing_weights=True to accept that (e.g. a new head)")
    return (model, info) if want_info else model


# ---------------------------------------------------------------------------------------------------------------
# The streaming loader


def _full_precision_dtype(value: Any, config: Any) -> torch.dtype:
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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are made in `dtype` (no fp32 copy first: a real-shape layer is 2 GB in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _stream_load(cls, pretrained, kwargs: Dict[str, Any], quantization: Optional[gptq_hooks.GPTQHooks]):
    kwargs = dict(kwargs)
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
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    tqdm_class = kwargs.pop("tqdm_class", None) or tqdm  # 5.x's from_pretrained takes one (transformers serve does)
    for ignored in ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "offload_folder",
                    "offload_state_dict", "_from_auto", "_from_pipeline", "_commit_hash", "quantization_config",
                    "key_mapping", "adapter_kwargs"):
        kwargs.pop(ignored, None)

    folder = _local_folder(path, subfolder, hub)
    if config is None:
        config, kwargs = cls.config_class.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    else:
        config = copy.deepcopy(config)
        for key in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
    if kwargs:
        raise TypeError(f"from_pretrained: unexpected keyword arguments {sorted(kwargs)}")
    if attn_implementation is not None or quantization is None:
        config._attn_implementation = attn_implementation or "sdpa"  # what transformers picks for this class
    dtype = (quantization.compute_dtype(dtype, config) if quantization is not None
             else _full_precision_dtype(dtype, config))

    files = weight_files(folder)
    with torch.device("meta"), default_dtype(dtype):
        model = cls(config)
    key_of = key_mapping(model, files)
    quantized = quantization.swap_linears(model, files, key_of) if quantization is not None else {}
    devices = _placement(model, device_map, max_memory, dtype)
    with tqdm_class(total=len(files), desc="Loading weights", unit="tensor",
                    disable=not hf_logging.is_progress_bar_enabled()) as bar:
        info = _load_tensors(model, files, key_of, quantized, quantization, devices, dtype,
                             allow_missing or output_loading_info, ignore_mismatched, path, bar.update)
    _finish(model, folder, devices, device_map)
    if quantization is not None and devices and all(d.type == "cpu" for d in devices.values()):
        # Once, now that every tensor is in place: the CPU kernels' layout of the 4-bit weights (gptq/linear.py).
        gptq_linear.use_blocked_layout(model, in_place=True)  # in the buffers the loader made: no extra memory
    if quantization is None:
        compat.set_config_dtype(model.config, dtype)
    else:
        quantization.describe(path, len(quantized), dtype)
    model.config._name_or_path = path
    return (model, info) if output_loading_info else model


def _placement(model: nn.Module, device_map, max_memory, dtype: torch.dtype) -> Dict[str, torch.device]:
    """{module name prefix: device} ("" = the whole model)."""
    if device_map is None:
        return {"": torch.device("cpu")}
    asked = f"device_map={device_map!r}" if isinstance(device_map, str) else "device_map"
    if device_map == "disk":
        device_map = {"": "disk"}  # refused below, by name
    if isinstance(device_map, (int, torch.device)) or (
            isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")):
        return {"": torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)}
    if isinstance(device_map, str):
        asked += f" with max_memory={max_memory!r}" if max_memory is not None else ""
        no_split = model._no_split_modules
        if device_map != "sequential" and torch.cuda.is_available():
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    devices = {}
    for name, device in device_map.items():
        if device == "disk":
            raise ValueError(f"{asked} puts {name or 'the model'!r} on disk: GPTQ layers cannot be offloaded to "
                             "disk (offload_folder is for full-precision checkpoints); place every module on a "
                             "device or 'cpu', allow more memory (max_memory) or choose a smaller model")
        devices[name] = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return devices


def _device_of(name: str, devices: Dict[str, torch.device]) -> torch.device:
    best = None
    for prefix in devices:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ValueError(f"device_map: no entry covers {name!r}")
    return devices[best]


def _load_tensors(model: nn.Module, files, key_of, quantized: Dict[str, str],
                  quantization: Optional[gptq_hooks.GPTQHooks], devices, dtype: torch.dtype,
                  allow_missing: bool = False, ignore_mismatched: bool = False, path: str = "",
                  advance: Callable[[int], Any] = lambda n: None) -> Dict[str, list]:
    """Every tensor of `files` into `model`; advance(n) after each n tensors read (a progress bar's update)."""
    loaded, expected, mismatched = set(), {}, []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        expected[key_of(name)] = name
    quantized_prefixes = set(quantized.values())
    for module_name, ckpt in quantized.items():  # each quantized layer's tensors together, by its hooks
        module = model.get_submodule(module_name)
        layer_keys = quantization.load_layer(module, ckpt, files, _device_of(module_name, devices), dtype)
        loaded |= layer_keys
        advance(len(layer_keys))
    unexpected = []
    for key, handle in files.items():
        if key in loaded or key.rsplit(".", 1)[0] in quantized_prefixes:
            continue
        advance(1)
        name = expected.get(key)
        if name is None:
            if not _IGNORED_EXTRA.match(key):
                unexpected.append(key)
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters.get(attr, module._buffers.get(attr))
        file_dtype, shape = handle.dtype_shape(key)
        if tuple(shape) != tuple(current.shape) and ignore_mismatched:
            mismatched.append((key, tuple(shape), tuple(current.shape)))  # left on meta: initialised below
            continue
        if tuple(shape) != tuple(current.shape):
            raise CheckpointError(f"{os.path.basename(handle.path)}: tensor {key!r} has shape {list(shape)}, the "
                                  f"model (config.json) expects {list(current.shape)}")
        if not file_dtype.is_floating_point:
            raise CheckpointError(f"{os.path.basename(handle.path)}: tensor {key!r} has dtype {file_dtype}, "
                                  "expected a floating-point tensor")
        tensor = handle.read(key).to(device=_device_of(module_name, devices), dtype=dtype)
        if attr in module._parameters:
            setattr(module, attr, nn.Parameter(tensor, requires_grad=current.requires_grad))
        else:
            setattr(module, attr, tensor)
        loaded.add(key)
    if mismatched:
        # transformers 4.x's words (on its logger), so the caller sees which tensors were re-initialised.
        compat.transformers_loading_logger().warning(
            f"Some weights of {type(model).__name__} were not initialized from the model checkpoint at {path} and "
            "are newly initialized because the shapes did not match:\n" + "\n".join(
                f"- {key}: found shape {list(old)} in the checkpoint and {list(new)} in the model instantiated"
                for key, old, new in mismatched)
            + "\nYou should probably TRAIN this model on a down-stream task to be able to use it for predictions "
            "and inference.")
    reinitialised = {key for key, _, _ in mismatched}
    missing = [k for k in _tie_or_fail(model, key_of, devices, dtype, allow_missing, path, reinitialised)
               if k not in reinitialised]
    if unexpected:
        logger.warning("qwen2_moe_hf: %d tensors in the checkpoint are not used by %s: %s%s", len(unexpected),
                       type(model).__name__, ", ".join(unexpected[:10]), " ..." if len(unexpected) > 10 else "")
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched, "error_msgs": []}


def _tie_or_fail(model: nn.Module, key_of, devices, dtype: torch.dtype, allow_missing: bool = False,
                 path: str = "", mismatched: Iterable[str] = ()) -> list:
    """Tie lm_head to the embeddings when the config says so; initialise what is still on the meta device when it
    may be (a new head, a tensor re-initialised for its size, or anything with allow_missing); raise for any other
    tensor the checkpoint lacks. Returns the checkpoint names of what was initialised."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(model.config, "tie_word_embeddings", False):
        output.weight = model.get_input_embeddings().weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    mismatched = set(mismatched)  # left on meta for their size (ignore_mismatched_sizes): no hole in the checkpoint
    fatal = [key_of(n) for n in missing if not (allow_missing or new_head(model, n) or key_of(n) in mismatched)]
    if fatal:
        raise CheckpointError(f"{len(fatal)} tensors the model needs are missing from the checkpoint: "
                              f"{', '.join(fatal[:10])}{' ...' if len(fatal) > 10 else ''} (nothing is "
                              "initialised at random in their place; allow_missing_weights=True accepts that)")
    for name in missing:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        device = _device_of(module_name, devices)
        if attr in module._parameters:
            setattr(module, attr, nn.Parameter(torch.empty(module._parameters[attr].shape, dtype=dtype,
                                                           device=device)))
        else:
            setattr(module, attr, torch.empty(module._buffers[attr].shape, dtype=dtype, device=device))
        model._init_weights(module)
    absent = [key_of(n) for n in missing if key_of(n) not in mismatched]
    if absent:
        _new_head_warning(model, path, absent)
    return [key_of(n) for n in missing]


def _finish(model: nn.Module, folder: str, devices, device_map) -> None:
    model.eval()
    config_file = os.path.join(folder, "generation_config.json")
    if os.path.isfile(config_file) and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    distinct = {str(d) for d in devices.values()}
    if device_map is not None:
        model.hf_device_map = {name: (d.index if d.type == "cuda" else d.type) for name, d in devices.items()}
    if len(distinct) > 1:
        dispatch_model(model, device_map=model.hf_device_map, offload_buffers=True)
