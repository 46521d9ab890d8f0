"""The gateway for weight-only int8 matrices (the quantized lm_head, placement.Int8Linear).

`gemm_int8` runs the CPU kernel for an int8 weight [N, K] with one scale per output row,
where `int8_kernel_runs(x)` says it has one; the caller keeps its own matmul path otherwise.

Apart from ops.py because it shares none of the 4-bit dispatch: no QLayer, no self-check,
a threshold of its own. ops re-exports `gemm_int8` and `int8_kernel_runs` (the compiled
module's messages name `bluelm_quant.ops.gemm_int8`); CPU_INT8_DEQUANT_MIN_M is read here,
so set it here.
"""
from __future__ import annotations

import torch

from . import cpu_settings, extension
from .extension import QuantOpError
from .qlayer import check_activation

# From this many activation rows on, placement.Int8Linear dequantizes chunks of rows and calls
# torch.matmul instead of the int8 kernel. SmolLM2's 49152x576 head, load ~10, best of 5 ms,
# int8 kernel / chunked: 1 thread M=1 7.3/134, M=16 33/106, M=64 71/133, M=128 202/155;
# 2 threads M=64 130/299, M=128 269/404.
CPU_INT8_DEQUANT_MIN_M = 128


def int8_kernel_runs(x: torch.Tensor) -> bool:
    """Whether `gemm_int8` has a kernel for activations x (else the caller's own matmul path)."""
    return (
        extension.quant_cuda() is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.numel() < CPU_INT8_DEQUANT_MIN_M * x.shape[-1]
    )


def gemm_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x @ (scale[:, None] * weight).T (+ bias) on the CPU kernel, in x's dtype.

    x [..., K] float32/bfloat16/float16 (float16 computed in float32); weight int8 [N, K]
    (nn.Linear's layout); scale [N] and bias [N] any float dtype. Check `int8_kernel_runs(x)`
    first: this raises QuantOpError where there is no kernel.
    """
    if not int8_kernel_runs(x):
        rows = x.numel() // max(x.shape[-1], 1)
        why = extension.load_error() if extension.quant_cuda() is None else f"{x.dtype} on {x.device}, {rows} rows"
        raise QuantOpError(f"gemm_int8: no int8 kernel for these activations ({why}); check ops.int8_kernel_runs(x)")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise QuantOpError(f"gemm_int8: weight must be a 2-D int8 tensor [N, K], got {weight.dtype} {tuple(weight.shape)}")
    check_activation(x, weight, weight.shape[1])
    dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    cpu_settings.check_cpu_threads()
    y = torch.ops.bluelm_quant.gemm_int8(
        x.reshape(-1, weight.shape[1]).to(dtype), weight, scale.to(dtype), None if bias is None else bias.to(dtype)
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["CPU_INT8_DEQUANT_MIN_M", "gemm_int8", "int8_kernel_runs"]
