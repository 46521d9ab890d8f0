"""Calibration sources -> seeded token windows, and the bundled calibration texts.

A source is a plain-text file (`.txt`, one document) or a file of records (`.jsonl`, or
`.json` holding a list of records or JSON lines), each record one document. Documents
are tokenized without special tokens and joined with the tokenizer's EOS between
records; windows of `seqlen` tokens are then cut at seeded random offsets of that
stream, as GPTQ does with C4. No BOS is inserted, so every window is real text.

`Source` says how to read a file of records: `fields` (its format, auto-detected from the
first record when None: "text", "belle", "prompt_response", "bluelm_sft"), `template` (a
`str.format` template over the record such as "{instruction}\\n{output}") or `chat` (its
prompt/response pairs formatted as a chat: "bluelm", "template" or a callable). The record
reader itself (formats, fields, chat formatting) is records.py, which the fine-tuning reader
(sft_data.py) shares; CalibrationDataError, the error of both modules, lives there.

Bundled texts (texts/SOURCES.md): `calibration_mix(name)` is a named mix of calibration
sources; `bundled_file` and `check_lang` find the bundled files for this module and for
eval_data.py, which holds the evaluation sets (held-out and out-of-domain) apart from the
calibration side. `calibration_windows` warns when two sources share text (bluelm_quant.overlap).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from .records import PRESETS, CalibrationDataError, ChatFormat, read_text, record_documents

logger = logging.getLogger(__name__)

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
LANGS = ("en", "zh")
# Calibration sources by name (file names, "{lang}" filled in), and named mixes of them.
# Every mix takes both languages of each of its sources; windows split evenly per file.
CALIB_SOURCES = {
    "reference": "calib_{lang}.txt",           # Debian Reference (the default)
    "faq": "calib_faq_{lang}.txt",             # Debian FAQ
    "maintguide": "calib_maintguide_{lang}.txt",  # Debian New Maintainers' Guide
    "chat": "calib_chat_{lang}.jsonl",         # instruction/response pairs written for bluelm-quant
}
CALIB_MIXES = {
    "default": ("reference",),
    "docs": ("reference", "faq", "maintguide"),
    "diverse": ("reference", "faq", "maintguide", "chat"),
    "chat": ("chat",),
}


@dataclass(frozen=True)
class Source:
    """One calibration file and how to read it; a plain path is Source(path)."""

    path: Union[str, os.PathLike]
    fields: str | None = None
    template: str | None = None
    chat: ChatFormat = None

    def __post_init__(self):
        if self.fields is not None and self.fields not in PRESETS:
            raise CalibrationDataError(
                f"{self.path}: fields={self.fields!r} is not one of {sorted(PRESETS)}; "
                "or give template='{field1}...{field2}'"
            )
        if self.template is not None and self.chat is not None:
            raise CalibrationDataError(
                f"{self.path}: give either template or chat, not both "
                "(a template is already the whole text of a record)"
            )
        if isinstance(self.chat, str) and self.chat not in ("bluelm", "template"):
            raise CalibrationDataError(
                f"{self.path}: chat={self.chat!r} must be 'bluelm', 'template' or a callable"
            )


# ---------------------------------------------------------------- the bundled texts

def bundled_file(name: str) -> Path:
    """A file of the bundled texts/ folder (FileNotFoundError saying how to get it back when missing)."""
    path = TEXTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the package was installed without its texts/ data; "
            "reinstall bluelm-quant or run tools/build_texts.py"
        )
    return path


def check_lang(lang: str) -> None:
    """ValueError unless the bundled texts have language `lang`."""
    if lang not in LANGS:
        raise ValueError(f"lang={lang!r}: bundled texts exist for {LANGS}")


def calibration_path(lang: str) -> Path:
    """Bundled calibration text for `lang` ("en" or "zh")."""
    check_lang(lang)
    return bundled_file(f"calib_{lang}.txt")


def default_sources() -> list[Source]:
    """The bundled English and Chinese calibration texts (mixed evenly)."""
    return [Source(calibration_path(lang)) for lang in LANGS]


def calibration_mix(name: str = "default", chat: ChatFormat = "template",
                    langs: Sequence[str] = LANGS) -> list[Source]:
    """The bundled calibration sources of mix `name` (CALIB_MIXES), both languages.

    chat: how the "chat" source's prompt/response records become text: "template" (the
    tokenizer's chat template: SmolLM2), "bluelm" (BlueLM's [|Human|]/[|AI|] format),
    a callable, or None (prompt and response joined by a newline).
    """
    if name not in CALIB_MIXES:
        raise ValueError(f"calibration mix {name!r} is not one of {sorted(CALIB_MIXES)}")
    sources = []
    for source in CALIB_MIXES[name]:
        for lang in langs:
            check_lang(lang)
            path = bundled_file(CALIB_SOURCES[source].format(lang=lang))
            sources.append(Source(path, chat=chat) if source == "chat" else Source(path))
    return sources


def source_name(src) -> str:
    """A source (path or Source) by name in warnings."""
    return str(src.path if isinstance(src, Source) else src)


# ---------------------------------------------------------------- reading documents

def load_documents(source: Union[Source, str, os.PathLike], tokenizer=None) -> list[str]:
    """The documents of one source as strings (`tokenizer` only for chat='template')."""
    src = source if isinstance(source, Source) else Source(source)
    path = Path(src.path)
    _check_readable(path)
    ext = path.suffix.lower()
    if ext == ".txt":
        if src.fields or src.template or src.chat:
            raise CalibrationDataError(f"{path}: fields/template/chat apply to .json/.jsonl only")
        text = read_text(path)
        if not text.strip():
            raise CalibrationDataError(f"{path} is empty")
        return [text]
    if ext not in (".json", ".jsonl"):
        raise CalibrationDataError(
            f"{path}: unknown extension {ext!r}; use .txt (plain text), .jsonl or .json (records)"
        )
    return record_documents(path, tokenizer, src.fields, src.template, src.chat)


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise CalibrationDataError(
            f"calibration source {path} is a directory; give the files in it (for example {path}/*.txt)"
        )
    if not path.exists():
        raise CalibrationDataError(f"calibration source {path} does not exist")
    if not path.is_file():
        raise CalibrationDataError(f"calibration source {path} is not a regular file")


# ---------------------------------------------------------------- token windows

def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a whole book is longer than model_max_length, which is fine here.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_stream(tokenizer, source, max_tokens: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The 1-D token stream of one source.

    Records are taken in a seeded random order (when `generator` is given) and
    tokenization stops once `max_tokens` is reached, so a large instruction set costs
    only what the windows need; a .txt file is tokenized whole, in order.
    """
    src = source if isinstance(source, Source) else Source(source)
    docs = load_documents(src, tokenizer)
    order = range(len(docs))
    if generator is not None and len(docs) > 1:
        order = torch.randperm(len(docs), generator=generator).tolist()
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i in order:
        doc_ids = _encode(tokenizer, docs[i])
        if not doc_ids:
            continue
        ids.extend(doc_ids)
        if len(docs) > 1 and eos is not None and doc_ids[-1] != eos:
            ids.append(eos)  # a document boundary the model knows
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def split_evenly(n: int, k: int) -> list[int]:
    """n items over k parts, as evenly as possible (the first parts get one more)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def calibration_windows(tokenizer, sources: Sequence | None = None, nsamples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens, LongTensor [nsamples, seqlen], on the CPU.

    sources: paths or `Source`s; None = the bundled English and Chinese texts. Windows
    are split as evenly as possible across sources, cut at random offsets of each
    source's token stream (windows of one source may overlap when its text is short),
    and returned in a shuffled order. The same tokenizer, sources and seed give the
    same tensor.
    """
    if nsamples < 1 or seqlen < 1:
        raise CalibrationDataError(f"nsamples={nsamples} and seqlen={seqlen} must be positive")
    sources = default_sources() if sources is None else list(sources)
    if not sources:
        raise CalibrationDataError("sources is empty; pass None for the bundled texts")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    per_source = []  # (name, its windows, its token stream) for the overlap check
    for src, count in zip(sources, split_evenly(nsamples, len(sources))):
        if count == 0:
            continue
        # Enough text that windows rarely overlap, without tokenizing a whole corpus.
        stream = token_stream(tokenizer, src, max_tokens=4 * count * seqlen, generator=gen)
        if stream.numel() < seqlen:
            path = src.path if isinstance(src, Source) else src
            raise CalibrationDataError(
                f"{path} gives {stream.numel()} tokens; one window needs seqlen={seqlen}. "
                "Add text or lower seqlen"
            )
        starts = torch.randint(0, stream.numel() - seqlen + 1, (count,), generator=gen)
        mine = [stream[s:s + seqlen] for s in starts.tolist()]
        rows.extend(mine)
        per_source.append((source_name(src), torch.stack(mine), stream))
    _warn_calibration_overlap(per_source)
    windows = torch.stack(rows)
    return windows[torch.randperm(windows.shape[0], generator=gen)]


def _warn_calibration_overlap(per_source) -> None:
    """Warns when two calibration sources hold the same text (a file given twice, or two
    extracts of one document): those windows weigh double and the mix is not what it says."""
    from .overlap import DEFAULT_NGRAM, Overlap, rows_hitting, span_hashes

    if len(per_source) < 2:
        return
    # Each source hashed once: its windows' spans, and the set of its stream's spans.
    rows = [span_hashes(windows) for _, windows, _ in per_source]
    spans = [span_hashes(stream).flatten().unique() for _, _, stream in per_source]
    for i, (name_a, windows_a, _) in enumerate(per_source):
        for j in range(i + 1, len(per_source)):
            k = rows_hitting(rows[i], spans[j])
            if k:
                logger.warning(Overlap(name_a, per_source[j][0], k, windows_a.shape[0], DEFAULT_NGRAM).message(
                    "calibration sources overlap, so that text weighs double in the mix"))
