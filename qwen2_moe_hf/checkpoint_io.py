"""Reading safetensors checkpoints tensor by tensor, straight into the tensors that keep them.

Why our own reader: a tensor is read with one readinto() into its final buffer, so loading holds each byte once
(no memory map whose pages stay resident beside the copies), and every fault (a truncated shard, a bad header,
a shard the index names that is not there) raises CheckpointError naming the file and tensor.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""

import json
import os
import struct

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be read as it should; the message names it."""


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked against the file's size; tensors read on demand."""

    def __init__(self, path):
        self.path = path
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: truncated ({size} bytes; not even a safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{name}: header of {length} bytes does not fit in the file ({size} bytes): "
                                      "truncated or not a safetensors file")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{name}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + length
        self.entries = {}
        for key, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{name}: tensor {key!r} has a malformed header entry {entry!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{name}: tensor {key!r} claims {end - begin} bytes, but dtype "
                                      f"{entry['dtype']} and shape {list(shape)} need {nbytes}")
            if self.data_start + end > size:
                raise CheckpointError(f"{name}: truncated: tensor {key!r} needs bytes up to "
                                      f"{self.data_start + end}, the file has {size}")
            self.entries[key] = (dtype, shape, begin)

    def keys(self):
        return self.entries.keys()

    def dtype_shape(self, key):
        dtype, shape, _ = self.entries[key]
        return dtype, shape

    def read(self, key):
        """The tensor `key` (CPU), read into a fresh buffer."""
        dtype, shape, begin = self.entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel() == 0:
            return tensor
        view = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(view))
        if got != view.nbytes:
            raise CheckpointError(f"{os.path.basename(self.path)}: truncated while reading tensor {key!r}")
        return tensor


def weight_files(folder):
    """{tensor name: SafetensorsFile} for a checkpoint folder (sharded with an index, or one file).
    Raises CheckpointError naming what is missing or inconsistent."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{INDEX_FILE}: not a valid index ({exc!r})") from None
        shards = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                names = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(f"{shard}: missing; {INDEX_FILE} puts {len(names)} tensors in it "
                                      f"(e.g. {names[0]})")
            shards[shard] = SafetensorsFile(path)
        files = {}
        for key, shard in weight_map.items():
            if key not in shards[shard].entries:
                raise CheckpointError(f"{shard}: has no tensor {key!r}, which {INDEX_FILE} says it holds")
            files[key] = shards[shard]
        for shard, handle in shards.items():  # tensors the index does not list are still the checkpoint's
            for key in handle.keys():
                files.setdefault(key, handle)
        return files
    candidates = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if SINGLE_FILE in candidates:
        candidates = [SINGLE_FILE]
    if not candidates:
        others = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found {', '.join(others)}: only safetensors are read)" if others else ""
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    if len(candidates) > 1:
        raise CheckpointError(f"{folder}: several .safetensors files ({', '.join(candidates)}) and no {INDEX_FILE}")
    handle = SafetensorsFile(os.path.join(folder, candidates[0]))
    return {key: handle for key in handle.keys()}


# Tensors a checkpoint may lack without harm: recomputed buffers, and the new head of a sequence classifier
# made from a language-model checkpoint (transformers warns about it, as it should).
_MAY_BE_MISSING = ("rotary_emb.inv_freq",)
_NEW_HEADS = ("score.",)


def key_mapping(model, checkpoint_keys):
    """model tensor name -> checkpoint tensor name (a base model and a *ForCausalLM differ by the "model." prefix)."""
    prefix = model.base_model_prefix
    has_base = isinstance(getattr(model, prefix, None), torch.nn.Module)
    ckpt_prefixed = any(k.startswith(prefix + ".") for k in checkpoint_keys)
    if has_base and not ckpt_prefixed:
        return lambda name: name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
    if not has_base and ckpt_prefixed:
        return lambda name: f"{prefix}.{name}"
    return lambda name: name


def check_against_model(cls, config, files):
    """Every checkpoint tensor the model uses has the shape the config gives it and a floating dtype; raises
    CheckpointError naming the file and tensor. Costs one model skeleton on the meta device."""
    with torch.device("meta"):
        skeleton = cls(config)
    key_of = key_mapping(skeleton, files)
    for name, tensor in list(skeleton.named_parameters()) + list(skeleton.named_buffers()):
        key = key_of(name)
        handle = files.get(key)
        if handle is None:
            continue  # missing tensors are reported after loading (see checked_load)
        dtype, shape = handle.dtype_shape(key)
        where = os.path.basename(handle.path)
        if tuple(shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)}, the config expects "
                                  f"{list(tensor.shape)}")
        if tensor.is_floating_point() and not dtype.is_floating_point:
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {dtype}, expected a floating-point tensor")


# Arguments only transformers' own loader handles: with any of them, it does the loading.
_TRANSFORMERS_ONLY = ("offload_folder", "offload_state_dict", "quantization_config", "load_in_8bit", "load_in_4bit",
                      "ignore_mismatched_sizes", "from_tf", "from_flax", "gguf_file", "state_dict", "variant",
                      "adapter_kwargs", "key_mapping", "tp_plan", "device_mesh")


def _streamable(kwargs):
    """Whether our streaming loader (gptq/loading.py, each tensor read once into its final buffer) loads this
    full-precision checkpoint: on transformers 4.x, whose loader holds a shard's memory map and its copies at once
    (1.6x the checkpoint in memory), for CPU placement. transformers 5.x maps the weights lazily; it keeps them."""
    from . import compat

    if compat.IS_V5 or any(kwargs.get(k) for k in _TRANSFORMERS_ONLY):
        return False
    return kwargs.get("device_map") in (None, "cpu") and kwargs.get("max_memory") is None


def checked_load(cls, load, pretrained, model_args, kwargs):
    """transformers' from_pretrained (`load`) for full-precision checkpoints, with our rules around it:
    - a local folder's shards are checked first (headers, sizes, the index, each tensor's shape and dtype against
      the config): faults raise CheckpointError naming the file and tensor, instead of a deserialisation error
      deep inside the loader or a re-initialised tensor;
    - only safetensors are read unless the caller passes use_safetensors=False (then transformers reads .bin with
      torch.load(weights_only=True));
    - a tensor the model needs but the checkpoint lacks raises (transformers would initialise it at random with
      a warning); allow_missing_weights=True keeps transformers' behaviour;
    - a tensor whose shape differs from the config's raises (5.x would re-initialise it at random) unless the
      caller passed ignore_mismatched_sizes=True.
    """
    kwargs = dict(kwargs)
    allow_missing = kwargs.pop("allow_missing_weights", False)
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("use_safetensors", True)
    folder = os.path.join(str(pretrained), kwargs.get("subfolder") or "")
    if os.path.isdir(folder) and kwargs["use_safetensors"] is not False:
        if _streamable(kwargs) and not model_args:
            # Our streaming loader reads the shards itself and checks every tensor's shape and dtype as it goes.
            from .gptq.loading import load_full_precision

            return load_full_precision(cls, pretrained, dict(kwargs, allow_missing_weights=allow_missing,
                                                             output_loading_info=want_info))
        files = weight_files(folder)
        if not kwargs.get("ignore_mismatched_sizes") and os.path.isfile(os.path.join(folder, "config.json")):
            config = kwargs.get("config")
            if not hasattr(config, "to_dict"):
                config = cls.config_class.from_pretrained(folder)
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
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(_MAY_BE_MISSING) and not k.startswith(_NEW_HEADS)
               and not (getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight"))]
    if missing and not allow_missing:
        raise CheckpointError(
            f"{len(missing)} tensors the model needs are missing from the checkpoint {pretrained}: "
            f"{', '.join(sorted(missing)[:10])}{' ...' if len(missing) > 10 else ''}. Nothing is initialised at "
            "random in their place; pass allow_missing_weights=True to accept that (e.g. a new head)")
    return (model, info) if want_info else model
