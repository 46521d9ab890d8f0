"""The record reader: JSON / JSONL files of records, their formats and fields.

A records file is `.jsonl`, or `.json` holding a list of records or JSON lines (BlueLM's
demo data is JSON lines even when named .json); each record is a JSON object. Formats
(`fields`, auto-detected from the first record when None; PRESETS):

    "text"             {"text": ...}
    "belle"            {"instruction": ..., "input": ... (optional), "output": ...}
    "prompt_response"  {"prompt": ..., "response": ...}
    "bluelm_sft"       {"inputs": "[|Human|]:...[|AI|]:", "targets": ...}
                       (BlueLM's fine-tuning demo data: already in chat format)

`record_pair` gives a record's (prompt, response); `record_documents` gives each record as
one document: the pair joined, a `str.format` template over the record such as
"{instruction}\\n{output}", or the pair formatted as a chat (`ChatFormat`): "bluelm"
([|Human|]:{q}[|AI|]:{a}</s>), "template" (the tokenizer's chat template), or a callable
(prompt, response) -> str.

Apart from data.py because two readers use it: the calibration reader (data.load_documents:
a record -> one document) and the fine-tuning reader (sft_data.read_pairs: a record ->
prompt, response). Both import this module, never the reverse; it knows nothing of tokens,
windows or the bundled texts. Its errors are CalibrationDataError (defined here, below both
readers; sft_data turns them into FinetuneDataError).
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

from .models.bluelm import chat_format


class CalibrationDataError(ValueError):
    """A calibration source cannot be turned into token windows."""


@dataclass(frozen=True)
class _Preset:
    prompt: tuple[str, ...]  # joined with "\n"; empty values skipped
    response: str
    optional: tuple[str, ...] = ()
    joiner: str = "\n"  # between prompt and response in plain (non-chat) text
    chat_ok: bool = True


PRESETS = {
    "text": _Preset((), "text", chat_ok=False),
    "belle": _Preset(("instruction", "input"), "output", optional=("input",)),
    "prompt_response": _Preset(("prompt",), "response"),
    # The prompt already carries the [|Human|]: / [|AI|]: markers.
    "bluelm_sft": _Preset(("inputs",), "targets", joiner="", chat_ok=False),
}
# Auto-detection order: the first preset whose required fields the first record has.
_DETECT_ORDER = ("bluelm_sft", "belle", "prompt_response", "text")

ChatFormat = Union[None, str, Callable[[str, str], str]]


def read_text(path: Path) -> str:
    """The file as UTF-8 text (CalibrationDataError saying which byte when it is not)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(
            f"calibration source {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "give .txt / .jsonl / .json files saved as UTF-8"
        ) from None
    except OSError as e:
        raise CalibrationDataError(f"cannot read calibration source {path}: {e.strerror or e}") from None


def read_records(path: Path) -> Iterable[tuple[str, dict]]:
    """Yields (location, record); location is "file:line" for error messages."""
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        for i, rec in enumerate(data):
            yield from _checked_record(f"{path} record {i}", rec)
        return
    # JSON lines (BlueLM's demo data is JSON lines even when named .json).
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
        yield from _checked_record(f"{path}:{lineno}", rec)


def _checked_record(where: str, rec) -> Iterable[tuple[str, dict]]:
    if not isinstance(rec, dict):
        raise CalibrationDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    yield where, rec


def _field(rec: dict, name: str, where: str, optional: bool = False) -> str:
    if name not in rec or rec[name] is None:
        if optional:
            return ""
        raise CalibrationDataError(
            f"{where}: record has no field {name!r} (its fields: {sorted(rec)})"
        )
    value = rec[name]
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def record_documents(path: Path, tokenizer=None, fields: str | None = None, template: str | None = None,
                     chat: ChatFormat = None) -> list[str]:
    """Each record of a records file as one document (`tokenizer` only for chat='template')."""
    records = list(read_records(path))
    if not records:
        raise CalibrationDataError(f"{path} holds no records")
    fmt = _record_formatter(path, records[0][1], tokenizer, fields, template, chat)
    docs = [fmt(rec, where) for where, rec in records]
    if not any(d.strip() for d in docs):
        raise CalibrationDataError(f"{path}: every record formats to empty text")
    return docs


def _record_formatter(path: Path, first: dict, tokenizer, fields: str | None, template: str | None,
                      chat: ChatFormat):
    if template is not None:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        if not names:
            raise CalibrationDataError(f"{path}: template {template!r} names no field")

        def fmt_template(rec, where):
            return template.format_map({n: _field(rec, n, where) for n in names})
        return fmt_template

    name = detect_fields(path, first, fields)
    preset = PRESETS[name]
    if chat is not None and not preset.chat_ok:
        raise CalibrationDataError(
            f"{path}: fields={name!r} records are not prompt/response pairs to format as a chat"
        )
    chat_fmt = _chat_formatter(chat, tokenizer, path)

    def fmt_preset(rec, where):
        prompt, response = record_pair(rec, name, where)
        if chat_fmt is not None:
            return chat_fmt(prompt, response)
        return preset.joiner.join(p for p in (prompt, response) if p)
    return fmt_preset


def detect_fields(path, first: dict, fields: str | None = None) -> str:
    """The record format (a PRESETS name) of a file whose first record is `first`; `fields` when given."""
    name = fields or next(
        (n for n in _DETECT_ORDER
         if all(f in first for f in PRESETS[n].prompt + (PRESETS[n].response,)
                if f not in PRESETS[n].optional)),
        None,
    )
    if name is None:
        raise CalibrationDataError(
            f"{path}: cannot tell the record format from the first record's fields "
            f"{sorted(first)}; pass Source(path, fields=one of {sorted(PRESETS)}) "
            "or Source(path, template='{a}\\n{b}')"
        )
    return name


def record_pair(rec: dict, fields: str, where: str) -> tuple[str, str]:
    """(prompt, response) of one record in format `fields` (the prompt fields joined by newlines)."""
    preset = PRESETS[fields]
    prompt = "\n".join(
        v for v in (_field(rec, f, where, f in preset.optional) for f in preset.prompt) if v
    )
    return prompt, _field(rec, preset.response, where)


def _chat_formatter(chat: ChatFormat, tokenizer, path: Path):
    if chat is None or callable(chat):
        return chat
    if chat == "bluelm":
        return chat_format.turn  # BOS is the tokenizer's job
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(
            f"{path}: chat='template' needs a tokenizer with a chat_template; "
            "use chat='bluelm' for BlueLM tokenizers"
        )

    def fmt(prompt, response):
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return fmt
