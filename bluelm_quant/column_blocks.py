"""Inference only, CPU: the wide 4-bit layers' qweight in column blocks, so that the kernel
reads each of its tasks' weights as one sequential stream.

Why: the CPU kernel gives each thread task a band of output columns and walks it group by
group, 16 packed rows at a time. In the standard [K/8, N] layout those rows lie N words apart,
so a task reads 16 runs of a few KB, 4N bytes apart. Where 4N is not a multiple of 32 KB
(BlueLM-7B's fused q/k/v, N=12288, and gate/up, N=22016) that pattern streamed at ~70% of the
read bandwidth of the same bytes, and the multiples of 32 KB (N=16384, 24576, 32768) at
~97%, on the dev machine's Xeon (Emerald Rapids; 1 thread, 4096 x N, cold weights on huge
pages). Stored as blocks [N/W][K/8][W], a decode task (one row) is one block and its rows are W
words apart: a group's rows are one contiguous run. (With more rows a task takes part of a block:
cpu_kernels.cpp block_chunk_width.) Measured there, 2 threads, M=1, GB/s of the 4-bit
weights (tools/bench_kernels.py --device cpu --huge-pages has the standard layout's figure):

    layer         read probe   standard   blocks (W)
    4096x12288       17.9        12.0      18.0 (1024)
    4096x22016       19.0        12.4      20.5 (2752)
    4096x4096        17.9        15.1      17.4 (1024)
    11008x4096       18.9        16.5      19.5 (1024)

The cost, on the same machine: calls of 2-8 rows (batched decode) are slower in blocks, summed
over those four shapes, cold, ms (standard / blocks): M=2 9.4 / 10.6, M=4 10.3 / 12.0, M=8 13.9 /
14.9, most of it on the 4096-wide layers; prefill (32-128 rows) within 3%. Batch-1 decode is
what the chat and the decode benchmarks run, so they take the blocks.

The outputs are bitwise those of the standard layout (each output column sums the same
products in the same order); tests/test_column_blocks.py checks every kernel body.

Where: `block_width` picks W for a layer. Layers narrower than MIN_COLUMNS keep the standard
layout: their rows are close together (SmolLM2's widest is 3072 columns, and its whole model
sits in this machine's L3), and a block per task would leave too few tasks to share between
threads. `use_column_blocks` converts a model's layers: into new tensors, which it then packs
into a huge-page arena (huge_pages.pack_kernel_tensors), or, right after such a packing (the
model alone holds its kernel tensors), in place, without a second copy of the weights at any
moment: cpu_decode.prepare_cpu_decode does that. Saving writes the
standard layout (QuantLinear._save_to_state_dict), a move off the CPU converts back, and every
other reader (reference path, dequantize, LoRA's input gradient) takes QLayer.column_qweight.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from .huge_pages import pack_kernel_tensors
from .nn import QuantLinear

MIN_COLUMNS = 4096  # 16 KB rows: below that, the standard layout streams as well
MIN_BLOCK, MAX_BLOCK = 1024, 4096  # columns: 4-16 KB of each packed row per task
MIN_TASKS = 4  # blocks per layer, so that a busy thread's share can move to another


def block_width(out_features: int) -> int | None:
    """The column block width for a layer with `out_features` outputs, or None (standard layout):
    the narrowest width in [MIN_BLOCK, MAX_BLOCK] that is a multiple of 64 (the AVX-512 tile)
    dividing out_features into at least MIN_TASKS blocks."""
    if out_features < MIN_COLUMNS:
        return None
    for width in range(MIN_BLOCK, MAX_BLOCK + 1, 64):
        if out_features % width == 0 and out_features // width >= MIN_TASKS:
            return width
    return None


def use_column_blocks(model: nn.Module, in_place: bool = False) -> int:
    """Put every CPU QuantLinear of `model` that runs on the kernel (4-bit, kernel layout) and has a
    block_width into column blocks. Returns how many layers are in column blocks.

    By default each layer gets a new tensor (a state_dict taken before keeps its layout) and the
    kernels' tensors are then packed into a new huge-page arena (unless huge_pages.disabled).
    in_place=True rewrites the tensors where they are: only when nothing but the model holds them,
    as right after huge_pages.pack_kernel_tensors."""
    layers = [(m, width) for m in model.modules()
              if isinstance(m, QuantLinear) and m.bits == 4 and m.kernel_group_size is not None
              and m.qweight.device.type == "cpu" and (width := block_width(m.out_features)) is not None]
    holders = Counter(m.qweight.data_ptr() for m, _ in layers)  # a tensor two layers share: never in place
    for module, width in layers:
        module.use_column_blocks(width, in_place=in_place and holders[module.qweight.data_ptr()] == 1)
    blocked = len(layers)
    if blocked and not in_place:
        pack_kernel_tensors(model)
    return blocked


__all__ = ["MAX_BLOCK", "MIN_BLOCK", "MIN_COLUMNS", "MIN_TASKS", "block_width", "use_column_blocks"]
