"""Overlap between token windows of two named inputs (evaluation sets, calibration sources).

Two inputs overlap when they hold the same text: a window of one that shares a span of
`ngram` consecutive tokens with the other is counted as an overlapping window. Spans are
compared by a 64-bit hash, computed with torch in chunks (no Python tuple per position),
so a 100k-token source costs a fraction of a second. 64 tokens is a sentence or two: a
shared caption or cross reference (~15 Chinese characters is ~32 SmolLM2 tokens) does not
count, a copied paragraph does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

DEFAULT_NGRAM = 64
_CHUNK = 8192  # rows hashed at once: [8192, ngram] int64 is 4 MB at ngram=64


@dataclass(frozen=True)
class Overlap:
    """`windows` of the `total` rows of input `a` share a span with input `b`."""

    a: str
    b: str
    windows: int
    total: int
    ngram: int

    def message(self, consequence: str = "") -> str:
        text = (f"{self.a!r} and {self.b!r} overlap: {self.windows} of {self.total} windows of "
                f"{self.a!r} share a {self.ngram}-token span with {self.b!r} (the same documents?)")
        return f"{text}; {consequence}" if consequence else text


def _coefficients(ngram: int) -> torch.Tensor:
    # Fixed odd multipliers: the same span hashes the same in every call and process.
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, 2**62, (ngram,), generator=gen, dtype=torch.long) * 2 + 1


def span_hashes(rows: torch.Tensor, ngram: int = DEFAULT_NGRAM) -> torch.Tensor:
    """Hashes of every `ngram`-token span of each row: [rows, positions] int64.

    rows: LongTensor [n, length] (windows) or [length] (one stream). Arithmetic wraps
    modulo 2**64, which is what makes it a hash.
    """
    if ngram < 1:
        raise ValueError(f"ngram={ngram} must be positive")
    rows = rows.reshape(1, -1) if rows.dim() == 1 else rows
    n, length = rows.shape
    if length < ngram:
        return torch.empty(n, 0, dtype=torch.long)
    coef = _coefficients(ngram)
    rows = rows.to(torch.long)
    positions = length - ngram + 1
    out = torch.empty(n, positions, dtype=torch.long)
    for r in range(n):
        for i in range(0, positions, _CHUNK):
            # unfold is a view; the product is the only [chunk, ngram] temporary.
            spans = rows[r, i:i + _CHUNK + ngram - 1].unfold(0, ngram, 1)
            out[r, i:i + spans.shape[0]] = (spans * coef).sum(1)
    return out


def rows_hitting(ha: torch.Tensor, hb: torch.Tensor) -> int:
    """How many rows of span hashes `ha` [n, positions] hold a hash of `hb`, a sorted
    1-D set (`span_hashes(...).flatten().unique()`)."""
    if ha.numel() == 0 or hb.numel() == 0:
        return 0
    # Binary search in the sorted set; torch.isin would sort `hb` again on every call.
    idx = torch.searchsorted(hb, ha).clamp_(max=hb.numel() - 1)
    return int((hb[idx] == ha).any(dim=1).sum())


def count_overlapping(a: torch.Tensor, b: torch.Tensor, ngram: int = DEFAULT_NGRAM) -> int:
    """How many rows of `a` share at least one `ngram`-token span with any row of `b`."""
    return rows_hitting(span_hashes(a, ngram), span_hashes(b, ngram).flatten().unique())


def find_overlaps(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor] | None = None,
                  ngram: int = DEFAULT_NGRAM) -> list[Overlap]:
    """Overlaps of every input of `first` with every input of `second`.

    Inputs are named LongTensors of token ids, [n, seqlen] windows or 1-D streams (one
    row). With `second` None, the inputs of `first` are compared with each other (each
    pair once, counting rows of the earlier one).
    """
    others = first if second is None else second
    pairs = ([(a, b) for i, a in enumerate(first) for b in list(first)[i + 1:]] if second is None
             else [(a, b) for a in first for b in second])
    rows = {a: span_hashes(t, ngram) for a, t in first.items()}  # each input hashed once
    spans = {b: span_hashes(t, ngram).flatten().unique() for b, t in others.items()}
    found = []
    for a, b in pairs:
        k = rows_hitting(rows[a], spans[b])
        if k:
            found.append(Overlap(a, b, k, rows[a].shape[0], ngram))
    return found


def warn_overlaps(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor] | None = None,
                  ngram: int = DEFAULT_NGRAM, consequence: str = "") -> list[Overlap]:
    """find_overlaps, with one logging warning per overlapping pair (`consequence` says
    what the overlap spoils)."""
    found = find_overlaps(first, second, ngram)
    for overlap in found:
        logger.warning(overlap.message(consequence))
    return found
