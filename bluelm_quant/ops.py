"""The only gateway to the quant_cuda extension.

Every quantized matmul goes through `gemm`; it checks its inputs, then runs the
extension's kernel when one exists for the device, dtype and bit width, and the
reference path (dequantize, then matmul) otherwise. The reference path is also the
oracle that the kernels are tested against.

Tensor layout (the standard GPTQ one, K = in_features, N = out_features):
  qweight int32 [K*bits/32, N]   codes packed along K, least-significant bits first
  qzeros  int32 [G, N*bits/32]   v1 zeros (zero - 1) packed along N
  scales  fp16/bf16/fp32 [G, N]
  g_idx   int32 [K]              group of each input row (any order: act-order)
"""
from __future__ import annotations

import torch

from .packing import pack_multiple, unpack_qweight, unpack_qzeros

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class QuantOpError(ValueError):
    """Inputs to a quantized op do not fit together."""


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


def prepare(qweight, qzeros, scales, g_idx, bits: int) -> dict[str, torch.Tensor]:
    """Extra tensors the kernel wants for this layer (repacked once at load time).

    Returned tensors become non-persistent buffers of the QuantLinear and come back to
    `gemm` as `kernel`. The reference path needs none.
    """
    check_layer(qweight, qzeros, scales, g_idx, bits)
    return {}


def gemm(x, qweight, qzeros, scales, g_idx, bits: int, bias=None, kernel=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K]; output in x's dtype.

    `kernel` is what `prepare` returned for these tensors (may be empty).
    """
    k = qweight.shape[0] * 32 // bits
    check_activation(x, qweight, k)
    return gemm_reference(x, qweight, qzeros, scales, g_idx, bits, bias)


__all__ = [
    "QuantOpError",
    "check_layer",
    "dequantize_reference",
    "gemm",
    "gemm_reference",
    "pack_multiple",
    "prepare",
]
