"""The GPTQ on-disk format: its settings, packing and unpacking, dequantization, and checks with named errors.

Tensors of one quantized Linear(in_features=K, out_features=N), `bits` b, group size G (AutoGPTQ layout):
  qweight int32 [K*b/32, N]  input row (32/b)*r + j of column n sits in bits b*j .. b*j+b-1 of qweight[r, n]
  qzeros  int32 [ceil(K/G), N*b/32]  zero of column (32/b)*c + j of group g in bits b*j.. of qzeros[g, c]
  scales  float [ceil(K/G), N]
  g_idx   int32 [K]  the group of each input channel (k // G, or any order with act-order / desc_act)
  bias    float [N]  optional (often an all-zero placeholder)
  W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]
  where zero = stored + 1 in the "gptq" (v1) checkpoint format and zero = stored in "gptq_v2". Like AutoGPTQ's
  reader, a v1 nibble is masked to b bits before the +1, so a stored 2**b - 1 means a zero of 2**b.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

import torch

SUPPORTED_BITS = (4, 8)
FORMATS = {"gptq": 1, "gptq_v1": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to the stored zero


class GPTQFormatError(ValueError):
    """A GPTQ setting or tensor that does not fit the format; the message names the field or tensor."""


@dataclass(frozen=True)
class GPTQSpec:
    """The settings a GPTQ checkpoint is read with (from `quantization_config` or `quantize_config.json`)."""

    bits: int = 4
    group_size: int = 128  # -1: one group over the whole input
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    # Names inside a decoder layer ("mlp.experts.3.up_proj"); empty: whatever the checkpoint quantized.
    modules_in_block_to_quantize: FrozenSet[str] = field(default_factory=frozenset)

    @property
    def zero_offset(self) -> int:
        return FORMATS[self.checkpoint_format]

    @classmethod
    def from_dict(cls, data: Any, source: str = "quantization_config") -> "GPTQSpec":
        """Parse and check a GPTQ config dict; raises GPTQFormatError naming `source`.field."""
        if hasattr(data, "to_dict"):
            data = data.to_dict()
        if not isinstance(data, dict):
            raise GPTQFormatError(f"{source}: expected a dict, got {type(data).__name__}")
        method = str(data.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise GPTQFormatError(f"{source}.quant_method: expected 'gptq', got {method!r}")
        bits = data.get("bits", 4)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise GPTQFormatError(f"{source}.bits: {bits!r} is not supported (supported: {SUPPORTED_BITS})")
        group_size = data.get("group_size", 128)
        if group_size is None:
            group_size = -1
        if not isinstance(group_size, int) or isinstance(group_size, bool) or not (
                group_size == -1 or group_size > 0):
            raise GPTQFormatError(f"{source}.group_size: expected -1 or a positive integer, got {group_size!r}")
        fmt = str(data.get("checkpoint_format") or data.get("format") or "gptq").lower()
        if fmt not in FORMATS:
            raise GPTQFormatError(f"{source}.checkpoint_format: {fmt!r} is not supported "
                                  f"(supported: {', '.join(sorted(FORMATS))})")
        modules = data.get("modules_in_block_to_quantize") or []
        names = set()
        for entry in modules:
            names.update([entry] if isinstance(entry, str) else entry)
        for key in ("sym", "desc_act"):
            if key in data and not isinstance(data[key], bool):
                raise GPTQFormatError(f"{source}.{key}: expected true or false, got {data[key]!r}")
        return cls(bits=bits, group_size=group_size, sym=data.get("sym", True), desc_act=data.get("desc_act", False),
                   checkpoint_format="gptq_v2" if fmt == "gptq_v2" else "gptq",
                   modules_in_block_to_quantize=frozenset(names))

    def to_dict(self, modules_in_block_to_quantize: Optional[Sequence[Sequence[str]]] = None) -> Dict[str, Any]:
        """The `quantization_config` a checkpoint written in this format carries."""
        data = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "checkpoint_format": self.checkpoint_format, "damp_percent": 0.01,
                "true_sequential": True}
        if modules_in_block_to_quantize:
            data["modules_in_block_to_quantize"] = [list(group) for group in modules_in_block_to_quantize]
        return data

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def group_of(self, in_features: int) -> torch.Tensor:
        """g_idx without act-order: k // G."""
        size = in_features if self.group_size == -1 else self.group_size
        return torch.arange(in_features, dtype=torch.int32) // size

    def tensor_shapes(self, in_features: int, out_features: int) -> Dict[str, Tuple[int, ...]]:
        """name -> shape of the tensors one Linear(in_features, out_features) is stored as."""
        per_int = 32 // self.bits
        groups = self.num_groups(in_features)
        return {"qweight": (in_features // per_int, out_features), "qzeros": (groups, out_features // per_int),
                "scales": (groups, out_features), "g_idx": (in_features,)}


# ---------------------------------------------------------------------------------------------------------------
# Packing: b-bit values, 32/b of them per int32, lowest bits first.

def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [K, N] (each in [0, 2**b)) -> int32 [K*b/32, N]: 32/b consecutive rows per int32 (qweight)."""
    per_int = 32 // bits
    k, n = values.shape
    v = (values.to(torch.int64).reshape(k // per_int, per_int, n)
         << _shifts(bits, values.device).to(torch.int64)[:, None])
    packed = v.sum(dim=1)  # disjoint bit fields: the sum is the OR
    return _to_int32(packed)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*b/32, N] -> int32 [K, N] values in [0, 2**b)."""
    per_int = 32 // bits
    v = (packed[:, None, :] >> _shifts(bits, packed.device)[None, :, None]) & (2**bits - 1)
    return v.reshape(packed.shape[0] * per_int, packed.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [G, N] -> int32 [G, N*b/32]: 32/b consecutive columns per int32 (qzeros)."""
    per_int = 32 // bits
    g, n = values.shape
    v = values.to(torch.int64).reshape(g, n // per_int, per_int) << _shifts(bits, values.device).to(torch.int64)
    return _to_int32(v.sum(dim=2))


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    v = (packed[:, :, None] >> _shifts(bits, packed.device)[None, None, :]) & (2**bits - 1)
    return v.reshape(packed.shape[0], packed.shape[1] * (32 // bits))


def _to_int32(packed64: torch.Tensor) -> torch.Tensor:
    # Values >= 2**31 are stored as their two's-complement int32, as AutoGPTQ's numpy uint32 -> int32 cast does.
    return torch.where(packed64 >= 2**31, packed64 - 2**32, packed64).to(torch.int32)


# The blocked layout of a 4-bit qweight, made once after loading on CPU (GPTQLinear.use_blocked_layout): the same
# int32 words as [N/64, K/8, 64], so that each block of 64 output columns is one contiguous stream for the CPU
# kernels (kernels/csrc/cpu/int4_gemm.h, kInt4BlockCols). Never written to a file: state_dict() gives the
# checkpoint layout back.
BLOCK_COLS = 64


def block_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, N] (N a multiple of BLOCK_COLS) -> [N/64, K/8, 64], a new contiguous tensor."""
    rows, n = qweight.shape
    return qweight.view(rows, n // BLOCK_COLS, BLOCK_COLS).permute(1, 0, 2).contiguous()


def block_qweight_(qweight: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """block_qweight within qweight's own (contiguous) storage, through `scratch` (int32, >= qweight's size):
    returns the blocked view of that storage; qweight's own values are reordered."""
    rows, n = qweight.shape
    copy = scratch[:qweight.numel()].view(rows, n // BLOCK_COLS, BLOCK_COLS)
    copy.copy_(qweight.view(rows, n // BLOCK_COLS, BLOCK_COLS))
    blocked = qweight.view(n // BLOCK_COLS, rows, BLOCK_COLS)
    blocked.copy_(copy.permute(1, 0, 2))
    return blocked


def unblock_qweight(blocked: torch.Tensor) -> torch.Tensor:
    """[N/64, K/8, 64] -> the checkpoint layout [K/8, N], a new contiguous tensor."""
    blocks, rows, cols = blocked.shape
    return blocked.permute(1, 0, 2).reshape(rows, blocks * cols)


def unblock_qweight_(blocked: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """unblock_qweight within blocked's own (contiguous) storage, through `scratch` (int32, >= its size): returns the
    [K/8, N] view of that storage; blocked's own values are reordered."""
    blocks, rows, cols = blocked.shape
    copy = scratch[:blocked.numel()].view(blocks, rows, cols)
    copy.copy_(blocked)
    flat = blocked.view(rows, blocks * cols)
    flat.view(rows, blocks, cols).copy_(copy.permute(1, 0, 2))
    return flat


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int = 4,
               zero_offset: int = 1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The full-precision weight [N, K] (nn.Linear layout) of GPTQ tensors, in `dtype` (default: scales' dtype)."""
    q = unpack_rows(qweight, bits)  # [K, N]
    zeros = unpack_cols(qzeros, bits) + zero_offset  # [G, N]
    g = g_idx.long()
    scale = scales.float()[g]  # [K, N]
    weight = scale * (q.float() - zeros.float()[g])
    return weight.t().contiguous().to(dtype or scales.dtype)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, zero_offset: int = 1,
                 g_idx: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a Linear weight [N, K] -> dict of GPTQ tensors (qweight, qzeros, scales,
    g_idx), scales in fp16. `g_idx` (int [K]) assigns inputs to groups in any order (act-order checkpoints);
    default k // group_size. Asymmetric zeros are kept in [zero_offset, 2**b - 1] (the v1 format stores zero - 1 in
    b bits). Every weight ends within half a step of its dequantized value: each group's scale is the smallest that
    keeps its range on the grid once the zero is fixed (a zero held at the format's bound needs a larger one),
    rounded up, not to nearest, to the fp16 it is stored in."""
    n, k = weight.shape
    maxq = 2**bits - 1
    if g_idx is None:
        size = k if group_size == -1 else group_size
        g_idx = torch.arange(k, dtype=torch.int32) // size
    g_idx = g_idx.to(torch.int32)
    gl = g_idx.long()
    groups = int(gl.max()) + 1
    w = weight.detach().float().t()  # [K, N]

    size = k // groups
    contiguous = k % groups == 0 and torch.equal(gl, torch.arange(k) // size)

    def reduce(op: str) -> torch.Tensor:
        if contiguous:  # the usual layout: groups are runs of `size` inputs, a reshape instead of a scatter (~4x)
            return getattr(w.view(groups, size, n), op)(dim=1)
        with warnings.catch_warnings():  # index_reduce_ is marked beta; its amax/amin are what we need
            warnings.simplefilter("ignore", UserWarning)
            return torch.zeros(groups, n).index_reduce_(0, gl, w, op, include_self=False)

    tiny = 2.0**-24  # fp16's smallest positive value: an all-zero group keeps a finite scale
    if sym:
        hi = torch.maximum(reduce("amax"), -reduce("amin"))
        lo = -hi
        zero = torch.full_like(hi, (maxq + 1) // 2)
    else:
        lo, hi = reduce("amin").clamp(max=0), reduce("amax").clamp(min=0)
        zero = torch.round(-lo / ((hi - lo) / maxq).clamp(min=tiny)).clamp(zero_offset, maxq)
    # w / scale + zero must stay in [-0.5, maxq + 0.5] for every weight of the group.
    scale = torch.maximum(hi / (maxq + 0.5 - zero), -lo / (zero + 0.5)).clamp(min=tiny)
    stored = scale.half()
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))),
                         stored)
    if contiguous:
        q = (w.view(groups, size, n) / stored.float()[:, None]).round_().add_(zero[:, None]).clamp_(0, maxq)
        q = q.view(k, n).to(torch.int32)
    else:
        q = torch.clamp(torch.round(w / stored.float()[gl]) + zero[gl], 0, maxq).to(torch.int32)
    return {"qweight": pack_rows(q, bits), "qzeros": pack_cols((zero.to(torch.int32) - zero_offset) & maxq, bits),
            "scales": stored, "g_idx": g_idx}


def check_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int,
                  spec: GPTQSpec, source: str = "") -> None:
    """Check one quantized Linear's tensors against each other and the config. `tensors`: name -> tensor (g_idx and
    bias optional). Shapes and dtypes are checked first; values (g_idx's range, finite scales and bias) only for
    tensors that hold data, so the loader can check the header's shapes (as meta tensors) before reading anything.
    Raises GPTQFormatError naming `prefix.name` (and `source`, the file) and what is wrong."""
    where = f" in {source}" if source else ""
    expected = spec.tensor_shapes(in_features, out_features)
    per_int = 32 // spec.bits
    if in_features % per_int or out_features % per_int:
        raise GPTQFormatError(f"{prefix}: in_features {in_features} and out_features {out_features} must be "
                              f"multiples of {per_int} to pack {spec.bits}-bit values")
    for name in ("qweight", "qzeros", "scales"):
        if name not in tensors:
            raise GPTQFormatError(f"{prefix}.{name}: missing{where}")
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            hint = ""
            if name == "qzeros" or name == "scales":
                found_groups = t.shape[0] if t.dim() else None
                hint = (f" ({found_groups} groups found; group_size {spec.group_size} over {in_features} inputs "
                        f"gives {expected['scales'][0]})")
            raise GPTQFormatError(f"{prefix}.{name}{where}: shape {tuple(t.shape)}, expected {shape} for "
                                  f"Linear({in_features} -> {out_features}) at {spec.bits} bits{hint}")
        want = (torch.int32,) if name != "scales" else (torch.float16, torch.bfloat16, torch.float32)
        if t.dtype not in want:
            raise GPTQFormatError(f"{prefix}.{name}{where}: dtype {t.dtype}, expected "
                                  f"{' or '.join(str(d) for d in want)}")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise GPTQFormatError(f"{prefix}.bias{where}: shape {tuple(bias.shape)}, expected ({out_features},)")
    if bias is not None and not bias.dtype.is_floating_point:
        raise GPTQFormatError(f"{prefix}.bias{where}: dtype {bias.dtype}, expected a floating-point tensor")
    if tensors["scales"].device.type == "meta":
        return
    if bias is not None and not torch.isfinite(bias).all():
        raise GPTQFormatError(f"{prefix}.bias{where}: contains NaN or inf")
    g_idx = tensors.get("g_idx")
    if g_idx is not None and g_idx.numel():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        groups = expected["scales"][0]
        if lo < 0 or hi >= groups:
            raise GPTQFormatError(f"{prefix}.g_idx{where}: group indices span [{lo}, {hi}], expected [0, "
                                  f"{groups - 1}] ({groups} groups of scales)")
    scales = tensors["scales"]
    if not torch.isfinite(scales).all():
        raise GPTQFormatError(f"{prefix}.scales{where}: contains NaN or inf")
