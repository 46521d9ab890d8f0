"""Pure quantization-grid functions: find scale/zero, quantize, dequantize, RTN.

Weights are in nn.Linear orientation, W [N, K] (out_features, in_features). A grid is
one (scale, zero) per output channel for a run of input columns (a group). Zeros are
the *true* zero points (integers held in float), codes lie in [0, 2**bits - 1] and
    w ~= scale * (code - zero).
Scales are rounded to the dtype they will be stored in (fp16 by default, as the GPTQ
ecosystem stores them) before codes are chosen, so that what is saved is exactly what
was optimised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QuantConfig

MSE_GRID = 100  # candidate shrink factors 1, 0.99, ... (as in the GPTQ reference)
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


@dataclass
class QuantizedWeight:
    """The result of quantizing one weight matrix, before packing."""

    codes: torch.Tensor  # int32 [N, K], in the original column order
    scales: torch.Tensor  # float32 [groups, N]
    zeros: torch.Tensor  # int32 [groups, N], true zero points
    g_idx: torch.Tensor  # int32 [K], the group of each input column
    bits: int

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output channels [start, stop): one Linear's share of a stacked weight."""
        return QuantizedWeight(
            self.codes[start:stop].clone(), self.scales[:, start:stop].clone(),
            self.zeros[:, start:stop].clone(), self.g_idx.clone(), self.bits,
        )

    def dequantize(self) -> torch.Tensor:
        """float32 W [N, K]."""
        g = self.g_idx.long()
        scale = self.scales[g].T  # [N, K]
        zero = self.zeros[g].T.float()
        return scale * (self.codes.float() - zero)


def find_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse_clip: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w [N, cols] -> (scale [N] float32, zero [N] float32).

    The grid always contains 0 (as GPTQ's). Asymmetric zeros are kept >= 1 so that
    they can be stored in the v1 checkpoint format (which stores zero - 1).
    weights [cols]: with mse_clip, how much each column's error counts (GPTQ passes the
    Hessian diagonal: the mean square of that input, so the search minimises the
    output error rather than the weight error).
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if mse_clip:
        return _mse_params(w, xmin, xmax, bits, sym, scale_dtype, weights)
    return _grid(xmin, xmax, maxq, sym, scale_dtype)


def _grid(xmin, xmax, maxq, sym, scale_dtype):
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        # zero 0 cannot be stored as v1 (zero - 1); shift the grid one step up instead.
        low = zero < 1
        scale = torch.where(low, xmax / (maxq - 1), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    scale = scale.to(scale_dtype).float()
    # An fp16 scale can underflow to 0 for tiny weights; keep the grid usable.
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).tiny), scale)
    return scale, zero


def _mse_params(w, xmin, xmax, bits, sym, scale_dtype, weights=None):  # noqa: PLR0913 (find_params' arguments)
    """Shrink the range while it lowers sum |w - Q(w)|^2.4 (GPTQ's clipping search), each
    column's error times its weight when given."""
    maxq = 2**bits - 1
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale, best_zero = _grid(xmin, xmax, maxq, sym, scale_dtype)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        scale, zero = _grid(p * xmin, p * xmax, maxq, sym, scale_dtype)
        q = dequantize(quantize(w, scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
        err = (q - w).abs_().pow_(MSE_NORM)
        err = (err if weights is None else err * weights).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of w on the grid; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Column -> group for contiguous groups (the last may be partial)."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // gs).to(torch.int32)


def rtn(weight: torch.Tensor, config: QuantConfig, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K] on contiguous groups."""
    n, k = weight.shape
    w = weight.detach().float()
    gs = config.effective_group_size(k)
    scales, zeros, codes = [], [], []
    for start in range(0, k, gs):
        block = w[:, start : start + gs]
        scale, zero = find_params(block, config.bits, config.sym, config.mse_clip, scale_dtype)
        codes.append(quantize(block, scale[:, None], zero[:, None], config.maxq))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.int32),
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=default_g_idx(k, config.group_size),
        bits=config.bits,
    )
