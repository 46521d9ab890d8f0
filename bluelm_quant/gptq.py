"""The GPTQ solver for one weight matrix (Frantar et al., 2022, "GPTQ").

Pure: `GPTQ` accumulates the layer-input Hessian H = 2/n * sum x^T x and `quantize`
returns codes, grid and loss in a `GPTQResult`; no module is touched.

Weights are W [N, K] (nn.Linear orientation). Columns (input features) are quantized one
at a time; after each, the not-yet-quantized columns absorb its rounding error through
H^-1 (the Optimal Brain Surgeon update), so the layer's *output* error stays small.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .config import QuantConfig
from .quantizer import QuantizedWeight, dequantize, find_params, quantize

logger = logging.getLogger(__name__)

MAX_DAMP = 1.0  # damp retries double damp_percent up to this fraction of mean(diag(H))


class GPTQError(RuntimeError):
    """The calibration data or the Hessian cannot be used to quantize this layer."""


@dataclass
class GPTQResult:
    quantized: QuantizedWeight  # codes [N, K] in the original column order
    # The GPTQ objective as the reference prints it: sum over weights of (w - q)^2 / d^2 / 2,
    # d = U[i, i] with U the upper Cholesky factor of the damped H^-1 and w the error-updated
    # weight. It telescopes to trace((W - Q) H_damped (W - Q)^T) / 2, i.e. for H = 2/n X^T X:
    # ||X W^T - X Q^T||_F^2 / n (mean squared output error per sample) plus the damping term.
    loss: float
    row_loss: torch.Tensor  # float32 [N]: each output row's share of `loss` (rows are independent)
    damp: float  # the damp_percent finally used (larger than the config's after a retry)
    seconds: float

    @property
    def dequantized(self) -> torch.Tensor:
        """float32 W [N, K] as quantized (computed on demand: a 7B MLP's is 360 MB)."""
        return self.quantized.dequantize()


class GPTQ:
    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.device = torch.device(device)
        self._hessian: torch.Tensor | None = torch.zeros(in_features, in_features, device=self.device)
        self._symmetric = True  # False while only the upper panels hold the latest sums
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor | None:
        """The full symmetric Hessian (fp32 [K, K]); None after free()."""
        if self._hessian is not None and not self._symmetric:
            h = self._hessian
            for a, b in _panels(self.in_features):
                block = h[a:b, a:b]
                block.copy_(block.triu() + block.triu(1).T)  # exactly symmetric, like the panels below
                h[b:, a:b].copy_(h[a:b, b:].T)
            self._symmetric = True
        return self._hessian

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._hessian, self._symmetric = value, True

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations x [..., K] (any float dtype): every leading index is one sample."""
        if self._hessian is None:
            raise GPTQError("add_batch after free(): this solver's Hessian was released")
        if x.shape[-1] != self.in_features:
            raise GPTQError(f"activations have {x.shape[-1]} features, the layer has {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self.device)
        m = x.shape[0]
        if m == 0:
            return
        # Running mean: H_n = 2/n sum x^T x, so rescale the old sum by old_n/new_n and add
        # the new rows with weight 2/new_n, into an fp32 H.
        total = self.nsamples + m
        h = self._hessian
        h.mul_(self.nsamples / total)
        # fp32 whatever the activation dtype, as the reference does (a bf16 x^T x is 2.3x
        # faster on CPU but rounds each batch's sum to 8 bits; not worth the doubt).
        x = x.float()
        # H is symmetric: accumulate only the panels on and above the diagonal (about 60%
        # of the flops for K >= 1536); the H property mirrors them when H is read.
        for a, b in _panels(self.in_features):
            h[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], alpha=2.0 / total)
        self._symmetric = False
        self.nsamples = total
        # A NaN/Inf anywhere in x reaches its column's diagonal entry (a sum of squares
        # cannot cancel it): K checks instead of a pass over all activations.
        if not torch.isfinite(h.diagonal()).all():
            raise GPTQError("activations contain NaN/Inf (or values too large for fp32); the layer's inputs are broken upstream")

    def free(self) -> None:
        self.H = None

    def quantize(
        self,
        weight: torch.Tensor,
        config: QuantConfig,
        blocksize: int = 128,
        scale_dtype: torch.dtype = torch.float16,
        keep_hessian: bool = True,
    ) -> GPTQResult:
        """Quantize W [N, K]; the result's tensors live on this solver's device.

        keep_hessian=False hands H over to this call (as free() would after it), saving a
        K x K copy: 485 MB for a 7B down_proj.
        """
        tick = time.perf_counter()
        if blocksize < 1:
            raise GPTQError(f"blocksize={blocksize} must be positive")
        w, h = self._problem(weight, keep_hessian)
        groups = _Groups.for_config(w, config, scale_dtype, torch.diag(h))
        if config.desc_act:
            # Columns with the largest activations first, while many columns remain to
            # absorb their error; stable sort keeps ties deterministic.
            perm = torch.argsort(torch.diag(h), descending=True, stable=True)
            w, h = w[:, perm], h[perm[:, None], perm]  # one K x K copy, not two
        else:
            perm = torch.arange(w.shape[1], device=self.device)
        groups.order(perm)  # also puts the column weights in quantization order
        u, damp = _upper_inverse_cholesky(h, config.damp_percent)
        del h
        codes, row_loss = _solve_columns(w, u, groups, config.maxq, blocksize)
        quantized = QuantizedWeight(
            codes=codes[:, torch.argsort(perm)].to(torch.int32),
            scales=groups.scales,
            zeros=groups.zeros.to(torch.int32),
            g_idx=groups.g_idx(perm),
            bits=config.bits,
        )
        return GPTQResult(quantized, float(row_loss.sum()), row_loss, damp, time.perf_counter() - tick)

    def _problem(self, weight: torch.Tensor, keep_hessian: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 copies of W and H to work on, checked; dead inputs pinned."""
        if self.H is None or self.nsamples == 0:
            raise GPTQError("no calibration activations: call add_batch before quantize")
        n, k = weight.shape
        if k != self.in_features:
            raise GPTQError(f"weight is [{n}, {k}] but the Hessian is for {self.in_features} inputs")
        if not all_finite(self.H):
            raise GPTQError("Hessian contains NaN/Inf (activations too large for fp32?)")
        w = weight.detach().to(self.device, torch.float32, copy=True)
        if not all_finite(w):
            raise GPTQError("weight contains NaN/Inf")
        h = self.H.clone() if keep_hessian else self.H
        if not keep_hessian:
            self.free()
        # An input that is always zero carries no information: any weight works, so pin
        # it to 0 and make H invertible there (the reference's choice).
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        return w, h


@dataclass
class _Groups:
    """Each group's grid (scale, zero per output row), and the group of each column."""

    scales: torch.Tensor  # [G, N] float32
    zeros: torch.Tensor  # [G, N] float32
    size: int  # columns per group (K for per-channel)
    static: bool  # grids fixed from the original columns before any reordering
    find: Callable  # (weights [N, cols], column weights [cols] or None) -> (scale [N], zero [N])
    col_weight: torch.Tensor | None  # [K]: how much each column's error counts in the clip search
    col_group: list[int] = None  # group of each column, in quantization order

    @classmethod
    def for_config(cls, w: torch.Tensor, config: QuantConfig, scale_dtype: torch.dtype,
                   h_diag: torch.Tensor) -> "_Groups":
        n, k = w.shape
        ngroups, size = config.groups(k), config.effective_group_size(k)
        find = partial(find_params, bits=config.bits, sym=config.sym, mse_clip=config.mse_clip, scale_dtype=scale_dtype)
        col_weight = h_diag.clone() if config.mse_clip and config.clip_weights == "hessian" else None
        groups = cls(torch.zeros(ngroups, n, device=w.device), torch.zeros(ngroups, n, device=w.device), size,
                     config.static_groups, find, col_weight)
        if groups.static:
            # Fixed before any reordering or error feedback: group g is original columns g*size...
            for g in range(ngroups):
                groups.scales[g], groups.zeros[g] = find(w[:, g * size : (g + 1) * size],
                                                         weights=groups.weights(g * size, (g + 1) * size))
        return groups

    def order(self, perm: torch.Tensor) -> None:
        """Columns are quantized in `perm` order: static groups follow their columns, the
        others are consecutive runs of that order."""
        k = perm.shape[0]
        self.col_group = (perm // self.size).tolist() if self.static else [i // self.size for i in range(k)]
        if self.col_weight is not None:
            self.col_weight = self.col_weight[perm]

    def weights(self, start: int, stop: int) -> torch.Tensor | None:
        """Clip-search weights of columns [start, stop) (in the current column order)."""
        return None if self.col_weight is None else self.col_weight[start:stop]

    def g_idx(self, perm: torch.Tensor) -> torch.Tensor:
        """int32 [K]: the group of each column in the original order."""
        g_idx = torch.empty(perm.shape[0], dtype=torch.int32, device=perm.device)
        g_idx[perm] = torch.tensor(self.col_group, dtype=torch.int32, device=perm.device)
        return g_idx


def _solve_columns(w: torch.Tensor, u: torch.Tensor, groups: _Groups, maxq: int, blocksize: int):
    """The GPTQ column loop over W (permuted; updated in place): (uint8 codes [N, K], row loss [N])."""
    n, k = w.shape
    gs = groups.size
    # Codes fit a byte (bits <= 8); a float [N, K] per result would cost 4x the memory.
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    row_loss = torch.zeros(n, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            i = i1 + j
            if not groups.static and i % gs == 0:
                # The grid sees the group's weights as they are now, after the updates
                # from every column quantized so far (columns past this block still
                # owe the block's lazy update, applied here just for them).
                end = min(i + gs, k)
                cols = w1[:, j : end - i1]
                if end > i2:
                    rest = w[:, i2:end] - err1[:, :j] @ u[i1:i, i2:end]
                    cols = torch.cat([cols, rest], dim=1)
                groups.scales[i // gs], groups.zeros[i // gs] = groups.find(cols, weights=groups.weights(i, end))
            s, z = groups.scales[groups.col_group[i]], groups.zeros[groups.col_group[i]]
            c = quantize(w1[:, j], s, z, maxq)
            codes[:, i] = c.to(torch.uint8)
            # OBS via U (upper, U^T U = H^-1): for the still-free columns F = i.., the
            # inverse of H's trailing block is U[F, F]^T U[F, F], whose row i is
            # U[i, i] * U[i, F] and diagonal entry U[i, i]^2. So the OBS update
            # -(w - q) / [H_F^-1]_ii * H_F^-1[i, F] is -(w - q) / U[i, i] * U[i, F]:
            # no H^-1 downdate between columns.
            e = (w1[:, j] - dequantize(c, s, z)) / u1[j, j]
            err1[:, j] = e
            w1[:, j + 1 :].addr_(e, u1[j, j + 1 :], alpha=-1)
        row_loss += err1.square().sum(dim=1) / 2
        # Lazy batch update: the rest of W gets the whole block's error in one matmul.
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)
    return codes, row_loss


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t, without temporaries: isfinite(t).all() allocates 1.7x t's size
    (820 MB for a 7B down_proj Hessian); min and max propagate NaN and expose an Inf."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _panels(k: int) -> list[tuple[int, int]]:
    """Column ranges of the row panels H[a:b, a:] that cover H's upper triangle.

    More panels skip more of the lower triangle but make smaller matmuls; about 384 wide
    measured best here (K = 1536: 96 ms vs 145 ms for the full x^T x per 4096 rows).
    """
    n = max(1, round(k / 384))
    edges = [k * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _upper_inverse_cholesky(h: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, U upper; doubles damp on failure.

    `h` is the caller's own copy (the damping is added in place and taken back). Besides
    `h`, one K x K matrix: the Cholesky factor's storage then holds H^-1, then U (the
    out-of-place calls allocate two more temporaries: +970 MB for a 7B down_proj).
    """
    mean_diag = torch.diag(h).mean()
    damp, tried = damp_percent, []
    while True:
        h.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(h)
        h.diagonal().sub_(damp * mean_diag)
        if info.item() == 0:
            torch.cholesky_inverse(factor, out=factor)
            _, info = torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if info.item() == 0 and all_finite(factor):
                return factor, damp
        del factor
        tried.append(damp)
        if damp >= MAX_DAMP:
            raise GPTQError(
                f"Hessian is not positive definite even with damp_percent in {tried}; "
                "use more (or more varied) calibration samples"
            )
        nxt = min(2 * damp, MAX_DAMP)
        logger.warning("Cholesky of the Hessian failed with damp_percent=%g; retrying with %g", damp, nxt)
        damp = nxt
