"""Integer codes <-> int32 words in the standard GPTQ layout.

Codes are laid into a little-endian bitstream: code i of a packed run occupies bits
[i*bits, (i+1)*bits) of the run, and the run is cut into 32-bit words, least-significant
bits first. For 2, 4 and 8 bits a word holds 32/bits whole codes; for 3 bits, 32 codes fill
exactly 3 words and codes 10 and 21 straddle a word boundary - the layout AutoGPTQ,
GPTQModel and vLLM use.

- qweight `[K*bits/32, N]`: codes of the weight, packed along K (the input dimension).
- qzeros  `[groups, N*bits/32]`: zero points, packed along N.
  v1 ("gptq") stores zero - 1 (wrapped to `bits` bits): what BlueLM-7B-Chat-4bits, AutoGPTQ
  and vLLM read; kernels add the 1 back, so v1 can express zeros 1..2**bits.
  v2 ("gptq_v2") stores the true zero 0..2**bits-1.
"""
from __future__ import annotations

import math

import torch

from .config import SUPPORTED_BITS


class PackingError(ValueError):
    """Codes or packed words do not fit the GPTQ layout."""


def codes_per_run(bits: int) -> tuple[int, int]:
    """(codes, words) in the smallest run that fills whole 32-bit words."""
    _check_bits(bits)
    codes = 32 // math.gcd(32, bits)
    return codes, codes * bits // 32


def pack_multiple(bits: int) -> int:
    """The packed dimension must be a multiple of this (8 for 4-bit, 32 for 3-bit)."""
    return codes_per_run(bits)[0]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise PackingError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along `dim` into int32 words."""
    run_codes, run_words = codes_per_run(bits)
    if codes.dim() != 2:
        raise PackingError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    length = codes.shape[dim]
    if length % run_codes:
        raise PackingError(
            f"{bits}-bit packing needs dimension {dim} to be a multiple of {run_codes}, "
            f"got {length} (shape {tuple(codes.shape)})"
        )
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 2**bits - 1):
        raise PackingError(
            f"codes must lie in [0, {2**bits - 1}] for {bits} bits, "
            f"got [{int(c.min())}, {int(c.max())}]"
        )
    c = c.movedim(dim, 0)  # [L, rest]
    runs = c.reshape(length // run_codes, run_codes, -1)  # [R, run_codes, rest]
    words = torch.zeros(runs.shape[0], run_words, runs.shape[2], dtype=torch.int64, device=c.device)
    for i in range(run_codes):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= (runs[:, i] << shift) & 0xFFFFFFFF
        spill = shift + bits - 32
        if spill > 0:  # the code straddles into the next word (3-bit only)
            words[:, word + 1] |= runs[:, i] >> (bits - spill)
    packed = words.reshape(-1, runs.shape[2])  # [L*bits/32, rest]
    return _to_int32(packed).movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> int32 codes, unpacked along `dim`."""
    run_codes, run_words = codes_per_run(bits)
    if words.dim() != 2:
        raise PackingError(f"expected 2-D packed words, got shape {tuple(words.shape)}")
    if words.dtype != torch.int32:
        raise PackingError(f"packed words must be int32, got {words.dtype}")
    length = words.shape[dim]
    if length % run_words:
        raise PackingError(
            f"{bits}-bit packed dimension {dim} must be a multiple of {run_words}, got {length}"
        )
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, 0)
    runs = w.reshape(length // run_words, run_words, -1)
    mask = 2**bits - 1
    codes = torch.empty(runs.shape[0], run_codes, runs.shape[2], dtype=torch.int64, device=w.device)
    for i in range(run_codes):
        word, shift = divmod(i * bits, 32)
        value = runs[:, word] >> shift
        if shift + bits > 32:
            value = value | (runs[:, word + 1] << (32 - shift))
        codes[:, i] = value & mask
    return codes.reshape(-1, runs.shape[2]).to(torch.int32).movedim(0, dim).contiguous()


# --- the two tensors of a quantized layer ------------------------------------------------


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> qweight int32 [K*bits/32, N]."""
    return pack(codes_kn, bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes int32 [K, N]."""
    return unpack(qweight, bits, dim=0)


# Columns per step of permute_rows: bounds its temporaries (~10 MB at K = 11008).
PERMUTE_COLUMNS = 2048


def permute_rows(qweight: torch.Tensor, order: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight with its code rows reordered: row i of the result is row order[i] of the input.

    For 4 bits, nibbles move straight between words (8 gathers per column block): a 7B
    act-order checkpoint's 224 layers repack in seconds, where unpacking to one int per
    code and packing again took minutes. Other widths go through unpack/pack.
    """
    k = qweight.shape[0] * 32 // bits
    if order.shape != (k,):
        raise PackingError(f"order has shape {tuple(order.shape)}, expected ({k},) for qweight {tuple(qweight.shape)}")
    if bits != 4:
        return pack_qweight(unpack_qweight(qweight, bits)[order.to(qweight.device, torch.int64)], bits)
    src = order.to(qweight.device, torch.int64).view(-1, 8)  # [K/8, 8]: source row of each nibble
    words, shifts = src // 8, (src % 8 * 4).to(torch.int32)
    out = torch.empty_like(qweight)
    for c0 in range(0, qweight.shape[1], PERMUTE_COLUMNS):
        block = qweight[:, c0 : c0 + PERMUTE_COLUMNS].contiguous()
        # >> on int32 is arithmetic (the mask drops the sign bits it brings in); << wraps, so
        # nibble 7 lands in the sign bit as the int32 layout wants.
        acc = (block[words[:, 0]] >> shifts[:, 0, None]) & 0xF
        for j in range(1, 8):
            acc |= ((block[words[:, j]] >> shifts[:, j, None]) & 0xF) << (4 * j)
        out[:, c0 : c0 + PERMUTE_COLUMNS] = acc
    return out


def pack_qzeros(zeros_gn: torch.Tensor, bits: int, fmt: str = "gptq") -> torch.Tensor:
    """True zero points [groups, N] (integers) -> qzeros int32 [groups, N*bits/32].

    fmt "gptq" (v1) stores zero - 1 and so needs zeros in [1, 2**bits - 1] to be
    readable by 2**bits-wide kernels; "gptq_v2" stores zeros in [0, 2**bits - 1].
    """
    z = zeros_gn.to(torch.int64)
    if fmt == "gptq":
        if z.numel() and int(z.min()) < 1:
            raise PackingError(
                f"a zero point of {int(z.min())} cannot be stored in the v1 'gptq' format "
                "(it stores zero - 1); save with checkpoint_format='gptq_v2'"
            )
        z = z - 1
    elif fmt != "gptq_v2":
        raise PackingError(f"unknown zero format {fmt!r}; use 'gptq' or 'gptq_v2'")
    return pack(z, bits, dim=1)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, fmt: str = "gptq") -> torch.Tensor:
    """qzeros -> true zero points int32 [groups, N] (v1: stored + 1, so 1..2**bits)."""
    stored = unpack(qzeros, bits, dim=1)
    if fmt == "gptq":
        return stored + 1
    if fmt != "gptq_v2":
        raise PackingError(f"unknown zero format {fmt!r}; use 'gptq' or 'gptq_v2'")
    return stored


def convert_qzeros(qzeros: torch.Tensor, bits: int, src: str, dst: str) -> torch.Tensor:
    """Convert packed zeros between v1 ('gptq') and v2 ('gptq_v2'), losslessly.

    Raises PackingError for the values one format cannot express in the other
    (v2 zero 0, or a v1 stored value that means 2**bits).
    """
    if src == dst:
        return qzeros
    zeros = unpack_qzeros(qzeros, bits, src)
    if dst == "gptq_v2" and int(zeros.max()) > 2**bits - 1:
        raise PackingError(
            f"v1 qzeros hold a zero of {int(zeros.max())}, which {bits}-bit v2 cannot store"
        )
    return pack_qzeros(zeros, bits, dst)


def gptq_tensors(qw, scale_dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A QuantizedWeight (codes [N, K], grid per group) -> the standard checkpoint tensors."""
    return {
        "qweight": pack_qweight(qw.codes.T, qw.bits),
        "qzeros": pack_qzeros(qw.zeros, qw.bits, "gptq"),
        "scales": qw.scales.to(scale_dtype),
        "g_idx": qw.g_idx.to(torch.int32),
    }
