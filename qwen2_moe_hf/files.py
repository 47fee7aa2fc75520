"""Checkpoint files: safetensors and JSON read with named errors, and folders written all at once.

Below everything that reads or writes checkpoints (the load plan in loading/, the GPTQ writer, the config reader).
Files are untrusted: every fault (a truncated shard, a bad header, an index that names a file outside the folder,
a config.json that is not a JSON object) raises CheckpointError naming the file and the tensor or field.

Why our own safetensors reader: a tensor is read with one readinto() into its final buffer, so loading holds each
byte once (no memory map whose pages stay resident beside the copies).
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Dict, Iterable, Iterator, KeysView, List, NoReturn, Tuple

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
CONFIG_FILE = "config.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_MAX_JSON = 64 * 1024 * 1024  # config.json, the index: kilobytes in practice
_HEADER_FIELDS = {"dtype", "shape", "data_offsets"}


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be read as it should; the message names it."""


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(raw: bytes, name: str, allow_constants: bool = True) -> dict:
    """A JSON object from bytes, strictly: UTF-8, no key twice in one object, not nested past Python's recursion
    limit, no NaN / Infinity unless `allow_constants`. Raises CheckpointError naming `name`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys,
                          **({} if allow_constants else {"parse_constant": _no_constant}))
    except _DuplicateKey as exc:
        raise CheckpointError(f"{name}: the key {exc.key!r} appears twice in one object") from None
    except RecursionError:
        raise CheckpointError(f"{name}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity
        raise CheckpointError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{name}: expected a JSON object, got {type(data).__name__}")
    return data


def read_json_object(path: str) -> dict:
    """A checkpoint's JSON file (config.json, the index) that must hold an object; CheckpointError naming the file
    otherwise, before reading more than _MAX_JSON bytes."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        if size > _MAX_JSON:
            raise CheckpointError(f"{name}: {size} bytes, more than the {_MAX_JSON} a checkpoint's JSON file may have")
        with open(path, "rb") as f:
            raw = f.read(_MAX_JSON + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_json_object(raw, name)


def read_config_json(folder: str) -> dict:
    return read_json_object(os.path.join(folder, CONFIG_FILE))


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_folder(dst: str, overwrite: bool = False, protect: Iterable[str] = ()) -> Iterator[str]:
    """Write a folder all at once: yields an empty temporary folder beside `dst`; when the block ends without an
    error its files are flushed to disk and it takes dst's place in one rename. On any error, Ctrl-C included, it is
    deleted: dst is then absent, or as it was. Refuses, before writing anything, a dst that is, lies inside or
    contains one of the `protect` folders (the sources being read), and an existing non-empty dst unless
    `overwrite`."""
    target = os.path.realpath(dst)
    for source in protect:
        source = os.path.realpath(source)
        if _inside(target, source) or _inside(source, target):
            raise ValueError(f"{dst}: the destination must not be, lie inside or contain the source {source}")
    if os.path.lexists(target) and not overwrite and not (os.path.isdir(target) and not os.listdir(target)):
        raise FileExistsError(f"{dst}: exists and is not empty; choose a new folder or pass overwrite=True "
                              "(--overwrite) to replace it")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
        backup = None
        try:
            if os.path.lexists(target):  # overwrite: the old folder steps aside until the new one is in place
                backup = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
                os.rename(target, os.path.join(backup, "old"))
            os.rename(tmp, target)
        except BaseException:
            if backup is not None:
                if os.path.lexists(os.path.join(backup, "old")) and not os.path.lexists(target):
                    os.rename(os.path.join(backup, "old"), target)
                shutil.rmtree(backup, ignore_errors=True)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked against the file's size; tensors read on demand.

    The file is untrusted: every field is checked before anything is allocated from it (dtype known; shape a list
    of non-negative integers; offsets two integers whose span is exactly the tensor's bytes; no two tensors
    overlapping, the data area covered exactly, nothing past the file's end; no name twice), and any fault raises
    CheckpointError naming the file and the tensor or field."""

    def __init__(self, path: str) -> None:
        self.path = path
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{name}: truncated ({size} bytes; not even a safetensors header)")
                (length,) = struct.unpack("<Q", head)
                if length == 0 or length > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{name}: header of {length} bytes does not fit in the file ({size} bytes): "
                                          "truncated or not a safetensors file")
                raw = f.read(length)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        header = parse_json_object(raw, f"{name}: corrupt safetensors header", allow_constants=False)
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{name}: __metadata__ must map strings to strings, got {metadata!r:.200}")
        self.metadata = metadata
        self.data_start = 8 + length
        available = size - self.data_start
        self.entries = {}
        spans = []
        for key, entry in header.items():
            where = f"{name}: tensor {key!r}"
            if not isinstance(entry, dict) or set(entry) != _HEADER_FIELDS:
                raise CheckpointError(f"{where} has a malformed header entry {entry!r:.200} (expected the fields "
                                      "dtype, shape, data_offsets)")
            dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            if dtype is None:
                raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r:.50} (known: {', '.join(_DTYPES)})")
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
                raise CheckpointError(f"{where}: shape {shape!r:.200} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise CheckpointError(f"{where}: data_offsets {offsets!r:.200} are not two integers 0 <= begin <= end")
            begin, end = offsets
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes:
                raise CheckpointError(f"{where} claims {end - begin} bytes, but dtype {entry['dtype']} and shape "
                                      f"{shape} need {nbytes}")
            if end > available:
                raise CheckpointError(f"{name}: truncated: tensor {key!r} needs bytes up to "
                                      f"{self.data_start + end}, the file has {size}")
            self.entries[key] = (dtype, tuple(shape), begin)
            spans.append((begin, end, key))
        covered = 0
        for begin, end, key in sorted(spans):
            if begin < covered:
                raise CheckpointError(f"{name}: tensor {key!r} overlaps the tensor before it (bytes {begin}..{end})")
            if begin > covered:
                raise CheckpointError(f"{name}: bytes {covered}..{begin} of the data belong to no tensor")
            covered = end
        if covered != available:
            raise CheckpointError(f"{name}: the header's tensors cover {covered} bytes of data, the file holds "
                                  f"{available}")

    def keys(self) -> KeysView[str]:
        return self.entries.keys()

    def dtype_shape(self, key: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        dtype, shape, _ = self.entries[key]
        return dtype, shape

    def read(self, key: str) -> torch.Tensor:
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


def _shard_path(folder: str, shard: Any) -> str:
    """The path of a shard the index names, which must lie in the checkpoint folder: not absolute, no '..', and
    not a symlink to elsewhere (except, for a Hugging Face cache snapshot, to the same repository's blobs)."""
    if (not isinstance(shard, str) or not shard or "\0" in shard or os.path.isabs(shard)
            or ".." in re.split(r"[\\/]", shard)):
        raise CheckpointError(f"{INDEX_FILE}: weight_map names the file {shard!r:.200}, which is not a path inside the "
                              "checkpoint folder")
    path = os.path.join(folder, shard)
    real, home = os.path.realpath(path), os.path.realpath(folder)
    if _inside(real, home):
        return path
    snapshots = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(snapshots) == "snapshots":  # the hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        blobs = os.path.realpath(os.path.join(os.path.dirname(snapshots), "blobs"))
        if _inside(real, blobs):
            return path
    raise CheckpointError(f"{INDEX_FILE}: {shard!r} leads outside the checkpoint folder (to {real})")


def weight_files(folder: str) -> Dict[str, SafetensorsFile]:
    """{tensor name: SafetensorsFile} for a checkpoint folder (sharded with an index, or one file).
    Raises CheckpointError naming what is missing, inconsistent or outside the folder."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{INDEX_FILE}: weight_map must map tensor names to shard file names, got "
                                  f"{type(weight_map).__name__}")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            path = _shard_path(folder, shard)
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
                other = files.setdefault(key, handle)
                if other is not handle and weight_map.get(key) != shard:
                    raise CheckpointError(f"tensor {key!r} is in both {os.path.basename(other.path)} and {shard}")
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
    handle = SafetensorsFile(_shard_path(folder, candidates[0]))
    return {key: handle for key in handle.keys()}
