"""Backward through a quantized Linear for its input; the quantized weight stays frozen.

LoRA on a 4-bit model (QLoRA-style) trains small adapters beside each QuantLinear, so the
gradient must flow *through* the quantized layer to the layers before it, but never *into*
its weight. For y = x @ W^T + b that gradient is dL/dx = dL/dy @ W.

Memory is the point of 4-bit training, so the backward never holds the weight in full
precision: nothing but the layer's own (shared) buffers is kept for backward, and W is
dequantized a block of output rows at a time (BLOCK_ELEMENTS values: 16 MB in float32,
whatever the layer size), each block's contribution added into dL/dx. The forward is
ops.gemm itself, so the kernels run during training exactly as in inference.

Act-order layers keep qweight's rows in the kernel's order (row r holds input row
perm[r], ops.prepare): the blocks come in that order, and dL/dx is scattered back to the
input's order once at the end.
"""
from __future__ import annotations

import torch

from . import ops
from .packing import pack_multiple

# Dequantized weight values per backward block: [K, BLOCK_ELEMENTS / K] at a time.
BLOCK_ELEMENTS = 1 << 22


def block_columns(k: int, n: int, bits: int) -> int:
    """Output columns per backward block: about BLOCK_ELEMENTS / k, a multiple of the packing unit."""
    multiple = pack_multiple(bits)
    return min(n, max(multiple, BLOCK_ELEMENTS // max(k, 1) // multiple * multiple))


def _compute_dtype(grad: torch.Tensor) -> torch.dtype:
    """The dtype the blocks are dequantized and multiplied in: the gradient's own, except float16
    on the CPU (no fast float16 matmul there; float32 is exact for float16 values)."""
    if grad.dtype == torch.float16 and grad.device.type == "cpu":
        return torch.float32
    return grad.dtype


def input_grad(grad_y: torch.Tensor, layer: ops.QLayer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dL/dx = dL/dy @ W for grad_y [..., N]: [..., K] in `dtype` (default grad_y's).

    Block products are summed in float32 (float64 for float64 gradients), so a bfloat16
    gradient is rounded once, not once per block.
    """
    n, k = layer.qweight.shape[1], layer.in_features
    if grad_y.shape[-1] != n:
        raise ops.QuantOpError(f"grad_y has {grad_y.shape[-1]} features in its last dimension, the layer has N={n}")
    compute = _compute_dtype(grad_y)
    g2 = grad_y.reshape(-1, n).to(compute)
    acc_dtype = torch.float64 if compute == torch.float64 else torch.float32
    acc = torch.zeros(g2.shape[0], k, dtype=acc_dtype, device=grad_y.device)
    step = block_columns(k, n, layer.bits)
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = ops.dequantize_columns(layer, start, stop, compute)  # [K, stop - start]
        block = torch.matmul(g2[:, start:stop], w.T)
        acc += block if block.dtype == acc_dtype else block.to(acc_dtype)
        del w, block
    if layer.perm is not None:  # column r of acc belongs to input row perm[r]
        grad_x = torch.empty_like(acc)
        grad_x[:, layer.perm.long()] = acc
        acc = grad_x
    return acc.to(dtype or grad_y.dtype).reshape(*grad_y.shape[:-1], k)


class QuantMatmul(torch.autograd.Function):
    """y = ops.gemm(x, layer), differentiable in x only (the layer's tensors are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: ops.QLayer) -> torch.Tensor:
        # The QLayer's tensors are the module's buffers: holding them keeps no extra copy.
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return ops.gemm(x, layer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        return input_grad(grad_y, ctx.layer, ctx.x_dtype), None


def quant_matmul(x: torch.Tensor, layer: ops.QLayer) -> torch.Tensor:
    """ops.gemm with a backward for x when autograd needs one; plain ops.gemm otherwise."""
    if x.requires_grad and torch.is_grad_enabled():
        return QuantMatmul.apply(x, layer)
    return ops.gemm(x, layer)


__all__ = ["BLOCK_ELEMENTS", "QuantMatmul", "block_columns", "input_grad", "quant_matmul"]
