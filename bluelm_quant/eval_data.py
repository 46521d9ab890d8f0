"""The bundled evaluation sets: held-out and out-of-domain texts, as files, texts or windows.

`eval_windows(tok, lang, domain)` gives the in-domain held-out ("in") or the out-of-domain
("out") evaluation windows of one language (EVAL_SETS; texts/SOURCES.md has the sources);
`heldout_text(lang)` is the in-domain text whole. `check_eval_overlap` warns when an
evaluation set shares text with calibration sources (bluelm_quant.overlap).

Apart from data.py, which reads calibration sources into windows, because evaluation is the
other side of that line: these sets must never be calibrated on. The bundled files, the
languages and the token streams come from data.py (this module imports it, never the reverse).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .data import bundled_file, check_lang, default_sources, source_name, split_evenly, token_stream

DOMAINS = ("in", "out")
# Evaluation sets by domain (file stems, "{lang}" filled in; texts/SOURCES.md has the
# sources). "in": held-out chapters of the document the default calibration text is cut
# from. "out": other documents, used by no calibration mix: a book and a desktop help
# (technical prose, like the calibration text) and a game's story text (narrative prose:
# another genre altogether).
EVAL_SETS = {
    "in": ("heldout_{lang}",),
    "out": ("eval_handbook_{lang}", "eval_gnomehelp_{lang}", "eval_wesnoth_{lang}"),
}


def heldout_path(lang: str) -> Path:
    """Bundled held-out evaluation text for `lang`; disjoint from the calibration text."""
    check_lang(lang)
    return bundled_file(f"heldout_{lang}.txt")


def heldout_text(lang: str) -> str:
    return heldout_path(lang).read_text(encoding="utf-8")


def _check_lang_domain(lang: str, domain: str) -> None:
    check_lang(lang)
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} must be one of {DOMAINS} (in: held-out chapters of "
                         "the calibration document; out: documents no calibration mix uses)")


def eval_paths(lang: str, domain: str = "in") -> dict[str, Path]:
    """The bundled evaluation files of one language and domain, by name (file stem)."""
    _check_lang_domain(lang, domain)
    return {stem.format(lang=lang): bundled_file(stem.format(lang=lang) + ".txt")
            for stem in EVAL_SETS[domain]}


def eval_texts(lang: str, domain: str = "in") -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in eval_paths(lang, domain).items()}


def eval_windows(tokenizer, lang: str, domain: str = "in", seqlen: int = 512,
                 max_windows: int | None = None) -> dict[str, torch.Tensor]:
    """Consecutive windows [n, seqlen] of each evaluation file of `lang` and `domain`.

    `max_windows` is split as evenly as possible over the files (the first windows of
    each); None takes every whole window. For domain "in" this is exactly what
    `perplexity(model, tok, heldout_text(lang), seqlen, max_windows)` scores.
    """
    from .evaluate import text_windows  # evaluate imports tqdm; keep this module light

    texts = eval_texts(lang, domain)
    if max_windows is not None and max_windows < len(texts):
        raise ValueError(f"max_windows={max_windows}: {lang}/{domain} has {len(texts)} files, "
                         "so at least one window each is needed")
    counts = ([None] * len(texts) if max_windows is None
              else split_evenly(max_windows, len(texts)))
    out = {}
    for (name, text), count in zip(texts.items(), counts):
        windows = text_windows(tokenizer, text, seqlen, count)
        if count is not None and windows.shape[0] < count:
            raise ValueError(f"{name} gives {windows.shape[0]} windows of seqlen={seqlen}, "
                             f"{count} asked; ask for fewer windows or a smaller seqlen")
        out[name] = windows
    return out


def check_eval_overlap(tokenizer, evaluation: dict[str, torch.Tensor], sources: Sequence | None = None,
                       ngram: int | None = None) -> list:
    """Warns (logging) for each evaluation set that shares text with a calibration source.

    evaluation: named windows (eval_windows); sources: calibration sources as given to
    calibration_windows (None = the bundled default). Returns the Overlap list.
    """
    from .overlap import DEFAULT_NGRAM, warn_overlaps

    sources = default_sources() if sources is None else list(sources)
    streams = {source_name(src): token_stream(tokenizer, src) for src in sources}
    return warn_overlaps(evaluation, streams, ngram or DEFAULT_NGRAM,
                         "perplexity on those windows is not measured on unseen text")


__all__ = ["DOMAINS", "EVAL_SETS", "check_eval_overlap", "eval_paths", "eval_texts", "eval_windows", "heldout_path",
           "heldout_text"]
