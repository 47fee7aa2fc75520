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
