"""A loaded CPU model's weights moved into memory advised for 2 MiB pages (transparent huge pages).

Decode on a CPU reads every weight once per token, in pieces of a few MiB. From 4 KiB pages each 4 KiB is another
TLB entry (a two-level page walk in a VM) and a boundary the hardware prefetchers stop at; from 2 MiB pages a
4-layer real-shape model decoded 1.04-1.11x faster (docs/benchmarks.md). torch advises huge pages only when
THP_MEM_ALLOC_ENABLE is set before it starts, and never for a tensor under 2 MiB (an int4 expert projection is
1.4 MiB), so `hold_in_huge_pages` moves a CPU model's large tensors once: packed back to back (4 KiB apart) into
mappings of up to 64 MiB, in module order. `from_pretrained` does it when QWEN2_MOE_HF_HUGE_PAGES=1: not by
default, as the first touch of a huge page can be slow (in the VMs this project is measured on, ~3.5 s per GiB
against 0.26 s for 4 KiB pages: the host hands each 2 MiB page back in on its first use), which would make a
load several times longer there.

Each moved tensor is its own storage, unmapped as it is freed; parameters stay parameters (requires_grad kept),
tied weights stay tied, values are bit for bit the same. The tensors are replaced (new objects), so the MoE
layers' prepared weights see the change and prepare again. Memory: one mapping's worth more at a time, and the
old copy's memory is handed back as each chunk is done (glibc keeps freed heap memory unless trimmed).
"""

import ctypes
import ctypes.util
import functools
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..kernels.build import cpu_module, load_cpu_ops

ENV_HUGE_PAGES = "QWEN2_MOE_HF_HUGE_PAGES"
MIN_BYTES = 64 << 10  # smaller tensors (norms, biases, g_idx) stay: they would waste most of a 4 KiB page each
CHUNK_BYTES = 64 << 20  # one mapping: the extra memory held while a chunk is copied


def wanted() -> bool:
    """Whether from_pretrained should move a CPU model's weights (QWEN2_MOE_HF_HUGE_PAGES=1; off by default)."""
    return os.environ.get(ENV_HUGE_PAGES, "").strip().lower() in ("1", "true", "yes", "on")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: "always", "madvise", "never", or "" where it cannot be read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def _slots(model: nn.Module) -> Iterator[Tuple[Dict[str, torch.Tensor], str, torch.Tensor]]:
    """(dict, key, tensor) for every parameter and buffer slot, in module order."""
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for key, tensor in slots.items():
                if tensor is not None:
                    yield slots, key, tensor


def _movable(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided
            and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size() >= MIN_BYTES)


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def hold_in_huge_pages(model: nn.Module) -> int:
    """Move `model`'s large CPU tensors (each at least MIN_BYTES, dense, contiguous, the whole of its storage) into
    huge-page-advised memory. Returns the bytes moved (0 where the CPU ops are unavailable or the kernel's THP mode
    is "never")."""
    if thp_mode() == "never" or not load_cpu_ops()[0]:
        return 0
    chunks = _chunks(model)
    moved = 0
    trim = _malloc_trim()
    while chunks:
        chunk = chunks.pop(0)  # with the model's slots, the only references to these tensors
        pieces, _ = cpu_module().huge_page_tensors([t.numel() * t.element_size() for t, _ in chunk])
        for (old, where), piece in zip(chunk, pieces):
            new = piece.view(old.dtype).view(old.shape)
            with torch.no_grad():
                new.copy_(old)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for slots, key in where:
                slots[key] = new
            moved += piece.numel()
        chunk = pieces = old = new = None  # the old tensors' last references go before the next chunk is made
        if trim is not None:
            trim(0)  # their memory, if glibc's heap held it, back to the system now
    return moved


Slot = Tuple[Dict[str, torch.Tensor], str]


def _chunks(model: nn.Module) -> List[List[Tuple[torch.Tensor, List[Slot]]]]:
    """The movable tensors in module order, each once with every slot that holds it (a tied weight is one object in
    two slots), in chunks of about CHUNK_BYTES. A storage that two different tensor objects cover (aliases the
    copies would split) is left out."""
    found: Dict[int, Tuple[torch.Tensor, List[Slot]]] = {}
    storages: Dict[int, set] = {}
    for slots, key, tensor in _slots(model):
        if not _movable(tensor):
            continue
        found.setdefault(id(tensor), (tensor, []))[1].append((slots, key))
        storages.setdefault(tensor.untyped_storage().data_ptr(), set()).add(id(tensor))
    chunks: List[List[Tuple[torch.Tensor, List[Slot]]]] = []
    size = CHUNK_BYTES
    for tensor, where in found.values():
        if len(storages[tensor.untyped_storage().data_ptr()]) > 1:
            continue
        if size >= CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append((tensor, where))
        size += tensor.numel() * tensor.element_size()
    return chunks
