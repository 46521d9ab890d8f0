"""A quantized Linear's tensors (`QLayer`): their checks, the reference path, the kernel layout.

Tensor layout (the standard GPTQ one, K = in_features, N = out_features):
  qweight int32 [K*bits/32, N]   codes packed along K, least-significant bits first
  qzeros  int32 [G, N*bits/32]   v1 zeros (zero - 1) packed along N
  scales  fp16/bf16/fp32 [G, N]
  g_idx   int32 [K]              group of each input row (any order: act-order)

A layer's tensors travel as a QLayer. `prepare` turns the standard layout into the kernel's:
for act-order, the rows of qweight are regrouped (one copy, not two) and `perm` says which
input row each holds; `standard_qweight` gives the checkpoint's order back for saving.
On the CPU a decode-ready model may also hold qweight in column blocks (`block`, see
column_blocks.py): the same [K/8, N] tensor whose memory runs block by block, [N/W][K/8][W].
Only the CPU kernel reads that form (`kernel_qweight`); everything else takes `column_qweight`.
The reference path (`dequantize_reference`, `gemm_reference`: dequantize, then matmul) runs
what has no kernel and is the oracle the kernels are tested against.

Apart from ops.py (which decides per call which code runs a matmul) because none of this
depends on that decision: it is the data, its layouts and the plain arithmetic on them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import extension
from .extension import QuantOpError, warn_once
from .packing import permute_rows, unpack_qweight, unpack_qzeros

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class QLayer(NamedTuple):
    """The tensors of one quantized Linear, as `gemm` and `dequantize` take them."""

    qweight: torch.Tensor  # [K*bits/32, N]; rows in `perm` order when perm is set
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor  # [K]: the group of each input row, in the original row order
    bits: int
    bias: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # int32 [K]: row r of qweight is input row perm[r]
    group_size: int | None = None  # the kernel layout's contiguous group size; None: reference path only
    block: int | None = None  # qweight's memory in column blocks of this width (CPU kernel layout)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    def kernel_qweight(self) -> torch.Tensor:
        """qweight as the kernel op takes it: [K/8, N], or its column blocks as [N/W, K/8, W] (a view)."""
        if self.block is None:
            return self.qweight
        rows, n = self.qweight.shape
        return self.qweight.view(n // self.block, rows, self.block)

    def column_qweight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Columns [start, stop) of qweight in the plain [K/8, N] layout (rows still in perm order): the
        tensor itself when it is not in column blocks, else a copy of the blocks they lie in."""
        n = self.qweight.shape[1]
        stop = n if stop is None else stop
        if self.block is None:
            return self.qweight if (start, stop) == (0, n) else self.qweight[:, start:stop]
        w = self.block
        first, last = start // w, -(-stop // w)
        blocks = self.kernel_qweight()[first:last].permute(1, 0, 2).reshape(self.qweight.shape[0], (last - first) * w)
        return blocks[:, start - first * w : stop - first * w]

    def kernel_g_idx(self) -> torch.Tensor:
        """The group of each row of qweight as stored (g_idx in perm order)."""
        return self.g_idx if self.perm is None else self.g_idx.index_select(0, self.perm)


def check_layer(qweight, qzeros, scales, g_idx, bits: int) -> tuple[int, int, int]:
    """Validate the four tensors against each other; returns (K, N, groups)."""
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32), ("g_idx", g_idx, torch.int32)):
        if t.dtype != dtype:
            raise QuantOpError(f"{name} must be {dtype}, got {t.dtype}")
    if scales.dtype not in FLOAT_DTYPES:
        raise QuantOpError(f"scales must be a float tensor, got {scales.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise QuantOpError(
            f"expected qweight/qzeros/scales 2-D and g_idx 1-D, got {tuple(qweight.shape)}, "
            f"{tuple(qzeros.shape)}, {tuple(scales.shape)}, {tuple(g_idx.shape)}"
        )
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise QuantOpError(f"scales {tuple(scales.shape)} must have N={n} columns like qweight {tuple(qweight.shape)}")
    if qzeros.shape != (groups, n * bits // 32):
        raise QuantOpError(
            f"qzeros shape {tuple(qzeros.shape)} does not fit scales {tuple(scales.shape)} at {bits} bits "
            f"(expected {(groups, n * bits // 32)})"
        )
    if g_idx.shape[0] != k:
        raise QuantOpError(f"g_idx has {g_idx.shape[0]} entries, expected K={k} (from qweight {tuple(qweight.shape)})")
    return k, n, groups


def dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, dtype=None) -> torch.Tensor:
    """The full weight W^T [K, N] = scale[g] * (code - zero[g]) in `dtype` (default scales')."""
    check_layer(qweight, qzeros, scales, g_idx, bits)
    codes = unpack_qweight(qweight, bits)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, "gptq")  # [G, N], true zeros
    g = g_idx.long()
    w = scales[g].float() * (codes - zeros[g]).float()
    return w.to(dtype or scales.dtype)


def gemm_reference(x, qweight, qzeros, scales, g_idx, bits: int, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias), dequantizing the whole weight first. x: [..., K]."""
    w = dequantize_reference(qweight, qzeros, scales, g_idx, bits, dtype=x.dtype)
    y = torch.matmul(x, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def dequantize(layer: QLayer, dtype=None) -> torch.Tensor:
    """W^T [K, N] in the original input order, in `dtype` (default the scales')."""
    w = dequantize_reference(layer.column_qweight(), layer.qzeros, layer.scales, layer.kernel_g_idx(), layer.bits, dtype)
    if layer.perm is None:
        return w
    out = torch.empty_like(w)
    out[layer.perm.long()] = w
    return out


def standard_qweight(layer: QLayer) -> torch.Tensor:
    """qweight in the checkpoint's row order (the input's own), whatever the kernel layout."""
    qweight = layer.column_qweight()
    if layer.perm is None:
        return qweight
    return repack_rows(qweight, torch.argsort(layer.perm.long()), layer.bits)


def to_column_blocks(qweight: torch.Tensor, block: int) -> torch.Tensor:
    """A plain [K/8, N] qweight's words in column blocks of `block` (QLayer.block): a new tensor of the
    same shape whose memory runs [N/block][K/8][block]. `block` must divide N."""
    rows, n = qweight.shape
    if block < 8 or block % 8 or n % block:
        raise QuantOpError(f"column block {block} must be a multiple of 8 dividing N={n}")
    return qweight.view(rows, n // block, block).permute(1, 0, 2).contiguous().view(rows, n)


def repack_rows(qweight: torch.Tensor, order: torch.Tensor, bits: int) -> torch.Tensor:
    """packing.permute_rows (row i of the result is row order[i]), on the extension's op for
    4-bit CPU tensors: a 7B layer in tens of milliseconds where torch's gathers take seconds."""
    if (extension.quant_cuda() is not None and bits == 4 and qweight.device.type == "cpu"
            and order.shape == (qweight.shape[0] * 8,)):
        return torch.ops.bluelm_quant.permute_rows_4bit(qweight, order.to(torch.int64))
    return permute_rows(qweight, order, bits)


def check_activation(x: torch.Tensor, qweight: torch.Tensor, in_features: int) -> None:
    if not x.is_floating_point():
        raise QuantOpError(f"activations must be a float tensor (fp16/bf16/fp32), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise QuantOpError(
            f"activations have {x.shape[-1]} features in their last dimension, "
            f"the layer expects in_features={in_features}"
        )
    if x.device != qweight.device:
        raise QuantOpError(f"activations are on {x.device} but the quantized weights are on {qweight.device}")


# --- load-time preparation ------------------------------------------------------------------


def _contiguous_group_size(g_sorted: torch.Tensor, k: int, groups: int) -> int | None:
    """The group size if sorted g_idx is exactly arange(K) // gs for some gs, else None."""
    gs = int((g_sorted == 0).sum())
    if gs == 0 or -(-k // gs) != groups:
        return None
    expected = torch.arange(k, dtype=torch.int64) // gs
    return gs if torch.equal(g_sorted.to(torch.int64), expected) else None


def prepare(qweight, qzeros, scales, g_idx, bits: int, bias=None) -> QLayer:
    """The layer in the kernel's layout (built once, at load time), from the standard tensors.

    The kernels take groups as contiguous runs of rows (row r in group r // group_size).
    Act-order checkpoints keep qweight in the original input order with a permuted g_idx;
    here rows are stable-sorted by g_idx and qweight is repacked in that order (a new
    tensor: the caller drops the old one), with `perm` for the kernel to gather x. If,
    after sorting, the groups are not runs of one size (a partial last group allowed), or
    that size is not a multiple of 8, or bits != 4, the QLayer has group_size None: the
    reference path (the reason is logged once). Tensors on the meta device are returned
    as they are, without a warning (QuantLinear.post_init runs again once they are loaded).
    """
    k, n, groups = check_layer(qweight, qzeros, scales, g_idx, bits)
    layer = QLayer(qweight, qzeros, scales, g_idx, bits, bias)
    if qweight.is_meta or g_idx.is_meta:
        return layer
    if bits != 4:
        warn_once(f"no kernel for {bits}-bit layers: they run on the reference path (dequantize + matmul)")
        return layer
    g = g_idx.detach().to("cpu", torch.int64)
    if k and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise QuantOpError(f"g_idx values lie in [{int(g.min())}, {int(g.max())}], expected [0, {groups}) for {groups} groups")
    order = torch.argsort(g, stable=True)
    gs = _contiguous_group_size(g[order], k, groups)
    if gs is None or gs % 8:
        warn_once(
            f"a layer's g_idx (K={k}, {groups} groups) does not form contiguous groups of one size that is a "
            "multiple of 8 after sorting: it runs on the reference path"
        )
        return layer
    if torch.equal(order, torch.arange(k)):
        return layer._replace(group_size=gs)
    return layer._replace(qweight=repack_rows(qweight, order, bits),
                          perm=order.to(device=qweight.device, dtype=torch.int32), group_size=gs)


__all__ = ["FLOAT_DTYPES", "QLayer", "check_activation", "check_layer", "dequantize", "dequantize_reference", "gemm_reference", "prepare",
           "repack_rows", "standard_qweight", "to_column_blocks"]
