"""The tensors the CPU kernels read every decode step, in one arena on transparent huge pages.

Why: at batch 1 the 4-bit kernel streams its weights in 2 KB row segments 16-44 KB apart, so
with 4 KB pages nearly every segment is on a page the TLB does not hold. With 2 MB pages one TLB
entry covers 512 times as much. Measured on the 2-core dev machine (THP in `madvise` mode), 4 KB
pages -> this arena, interleaved in one process:
  gemm_4bit alone, M=1, group 128 (tools/bench_kernels.py --device cpu --shapes
  4096x11008,11008x4096 --m 1 --heads "" --isa amx --threads 2,1 --iters 40 --huge-pages):
  2 threads 4096x11008 9.2 -> 10.3 GB/s, 11008x4096 12.6 -> 13.4; 1 thread 7.2 -> 8.5, 10.6 -> 11.2
  (1.12x, 1.06x, 1.19x, 1.06x; a second run 1.07x, 1.02x, 1.14x, 1.07x; a first scratch
  measurement 11.5 -> 13.6 and 14.3 -> 16.2 GB/s at 2 threads);
  SmolLM2-135M g64 compiled decode, int8 lm_head, fused (tools/bench_decode.py --model DIR
  --variants loop-compiled --lm-head-bits 8 --huge-pages on,off --rounds 7): median 73.4 -> 80.5
  tok/s (ahead in 7 of 7 rounds), 107.1 -> 114.4 (6 of 7), 85.4 -> 103.6 (6 of 7) in three runs,
  the same tokens.

How: `allocate_arena` maps private anonymous memory (Python's mmap.mmap(-1, n) default is
MAP_SHARED, i.e. shmem, which gets no huge pages in `madvise` mode), starts the arena on a 2 MB
boundary and madvises the whole huge pages inside it (check: AnonHugePages in
/proc/<pid>/smaps_rollup). `pack_kernel_tensors` copies every CPU tensor of the quantized layers
(QuantLinear, Int8Linear) into one such arena and swaps the module buffers for its tensors, one
tensor at a time, so the old tensors are freed as it goes.
Packing again (fuse_projections makes new tensors) builds a new arena; the old one is unmapped
once nothing points into it, which means both exist until the last tensor has moved (so
bluelm-chat loads a model it will fuse under `disabled()`, and only the fusing packs).

The tensors in the arena are ordinary contiguous tensors, each with a storage of its own:
saving (safetensors or torch.save), .to() and the kernels see no difference, and the arena is
released when its last tensor goes. Where Python or the platform offers no MADV_HUGEPAGE, or the
kernel refuses the advice, the arena is the same memory on small pages.
"""
from __future__ import annotations

import contextlib
import logging
import mmap

import torch
from torch import nn

from .nn import QuantLinear
from .placement import Int8Linear

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20  # a PMD-sized page on x86-64 and on arm64 with 4 KB base pages
TENSOR_ALIGN_BYTES = 64  # each tensor starts on a cache line, as a fresh allocation would

# The buffers each quantized layer reads per token (g_idx is not: the kernels take kernel_perm).
KERNEL_BUFFERS = {
    QuantLinear: ("qweight", "qzeros", "scales", "bias", "kernel_perm"),
    Int8Linear: ("weight_int8", "weight_scale"),
}

_packing_enabled = True


@contextlib.contextmanager
def disabled():
    """Within the block, `pack_kernel_tensors` leaves tensors where they are (so do the loaders and
    fuse_projections, which call it): for loading a model that is packed later (bluelm-chat fuses
    it), and the 4 KB-page baseline of tools/bench_decode.py --huge-pages."""
    global _packing_enabled
    was, _packing_enabled = _packing_enabled, False
    try:
        yield
    finally:
        _packing_enabled = was


def packing_enabled() -> bool:
    """Whether pack_kernel_tensors packs (False within `disabled()`)."""
    return _packing_enabled


def allocate_arena(nbytes: int) -> memoryview:
    """`nbytes` of writable memory, 2 MB-aligned, in private anonymous memory whose whole huge pages
    are madvised MADV_HUGEPAGE; the same without the advice where Python or the platform has no
    MADV_HUGEPAGE (or no MAP_PRIVATE: Windows), so on small pages. Never an error for that. Pages
    are mapped as they are first written, so the arena costs memory only as it is filled.

    `tensor_in(arena, offset, like)` makes tensors of it. A memoryview, not a tensor: tensors made
    with torch.frombuffer each get a storage of their own, and torch.save refuses one storage
    viewed as several dtypes (int32 codes, float scales, int8 head). Each storage holds the
    memoryview, which holds the mapping's buffer export: the mapping goes with the last tensor,
    and mapping.close() raises while one lives (torch.frombuffer keeps the object it is given
    alive but not an export of its own, so a bare mmap could be unmapped under a tensor).
    """
    mapping = _anonymous_mapping(nbytes + HUGE_PAGE_BYTES)
    whole = memoryview(mapping)
    address = torch.frombuffer(whole, dtype=torch.uint8, count=1).data_ptr()
    start = (HUGE_PAGE_BYTES - address % HUGE_PAGE_BYTES) % HUGE_PAGE_BYTES  # to the next 2 MB boundary
    whole_pages = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES  # a partial last page would back 2 MB
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and whole_pages:
        try:
            mapping.madvise(advice, start, whole_pages)
        except OSError as e:  # a kernel without THP: EINVAL. The memory is fine, on 4 KB pages.
            log.debug("madvise(MADV_HUGEPAGE) refused (%s): the arena stays on 4 KB pages", e)
    return whole[start : start + nbytes]


def _anonymous_mapping(nbytes: int) -> mmap.mmap:
    """Private where the platform says how: mmap.mmap(-1, n)'s default on Unix is MAP_SHARED, i.e.
    shmem, which gets no huge pages in THP's `madvise` mode."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)  # Windows: anonymous memory, no flags to pass


def tensor_in(arena: memoryview, offset: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor with `like`'s shape and dtype at byte `offset` of the arena,
    with a storage of its own that keeps the arena alive."""
    if not like.numel():  # torch.frombuffer refuses count 0; an empty tensor reads no memory anyway
        return torch.empty(like.shape, dtype=like.dtype)
    return torch.frombuffer(arena, dtype=like.dtype, count=like.numel(), offset=offset).view(like.shape)


def kernel_tensor_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every CPU tensor the quantized kernels read per token, in the
    model's module order (the order a decode step reads them)."""
    slots = []
    for module in model.modules():
        for cls, names in KERNEL_BUFFERS.items():
            if isinstance(module, cls):
                slots += [(module, n) for n in names
                          if getattr(module, n) is not None and getattr(module, n).device.type == "cpu"]
    return slots


def _identity(t: torch.Tensor) -> tuple:
    """Equal for two tensors over the same memory in the same way (fuse shares kernel_perm)."""
    return t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // TENSOR_ALIGN_BYTES) * TENSOR_ALIGN_BYTES


@torch.no_grad()
def pack_kernel_tensors(model: nn.Module) -> int:
    """Move every CPU tensor the quantized kernels read per token into one huge-page arena
    (`allocate_arena`), in module order, each 64-byte aligned; returns the arena's bytes (0: none
    to move, as for CUDA and full-precision models, or within `disabled()`).

    Each buffer is swapped for its arena tensor as soon as it is copied, so tensors only this model
    held are freed as the arena fills. A previous arena is freed once nothing points into it any
    more. QuantLinear drops its cached kernel plan when a buffer is assigned (its __setattr__).
    """
    if not _packing_enabled:
        return 0
    slots = kernel_tensor_slots(model)
    offsets, total = {}, 0
    for module, name in slots:
        t = getattr(module, name)
        if _identity(t) not in offsets:
            offsets[_identity(t)] = total
            total += _aligned(t.numel() * t.element_size())
    if not total:
        return 0
    arena = allocate_arena(total)
    moved = {}
    for module, name in slots:
        t = getattr(module, name)
        key = _identity(t)
        if key not in moved:
            moved[key] = tensor_in(arena, offsets[key], t).copy_(t)
        setattr(module, name, moved[key])
        del t  # the last reference to a tensor only this buffer held: freed before the next copy
    log.debug("%d kernel tensors (%.1f MB) moved onto huge pages", len(moved), total / 2**20)
    return total


__all__ = ["HUGE_PAGE_BYTES", "KERNEL_BUFFERS", "TENSOR_ALIGN_BYTES", "allocate_arena", "disabled",
           "kernel_tensor_slots", "pack_kernel_tensors", "packing_enabled", "tensor_in"]
