"""Instruction data for fine-tuning: records -> token ids with the loss on the response only.

Files are read with the record reader (records.py), which calibration shares: JSON lines, or a
.json list, of BELLE records {instruction, input, output}, {prompt, response}, or BlueLM's own
{inputs: "[|Human|]:...[|AI|]:", targets}, detected from the first record; or any two
columns named with prompt_column / response_column (BlueLM's LoRA script's flags; a
comma-separated prompt_column joins several columns with newlines, "instruction,input").

Each record becomes prompt ids + response ids; the labels are -100 on the prompt, so the
loss counts the response tokens (and the end-of-turn token that closes it) only, as
BlueLM's script trains. How the pair is framed (`style`):

    bluelm    BOS [|Human|]:{prompt}[|AI|]:{response}</s>   (BlueLM's chat format)
    raw       BOS {prompt}{response}</s>  for prompts already in that format (BlueLM's inputs)
    template  the tokenizer's chat template (a user turn, then the assistant's reply)
    plain     BOS {prompt}\\n{response}EOS, for base models without a chat format

"auto" picks raw when the prompts already start with [|Human|]:, bluelm for BlueLM models,
template when the tokenizer has one, plain otherwise. The same framing is what
bluelm_quant.chat sends at inference, so a tuned model sees what it was trained on.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .records import CalibrationDataError, detect_fields, read_records, record_pair
from .models.bluelm import chat_format

log = logging.getLogger(__name__)

STYLES = ("auto", "bluelm", "raw", "template", "plain")
IGNORE = -100  # label of a token the loss skips


class FinetuneDataError(ValueError):
    """A training or dev file cannot be turned into examples."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt

    @property
    def response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_pairs(path, prompt_column: str | None = None, response_column: str | None = None) -> list[tuple[str, str]]:
    """(prompt, response) of every record; named columns, or the format detected from the first record."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"data file {path} does not exist")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise FinetuneDataError(f"{path}: fine-tuning data must be .json or .jsonl records, got {path.suffix or 'no extension'!r}")
    try:
        records = list(read_records(path))
        if not records:
            raise FinetuneDataError(f"{path} holds no records: it needs JSON objects with a prompt and a response")
        if (prompt_column is None) != (response_column is None):
            raise FinetuneDataError(f"{path}: give both prompt_column and response_column, or neither (to detect the format)")
        if prompt_column is None:
            fields = detect_fields(path, records[0][1])
            if fields == "text":
                raise FinetuneDataError(f"{path}: records hold plain 'text', not prompt/response pairs; name the columns "
                                        f"(columns found: {', '.join(sorted(records[0][1]))})")
            return [record_pair(rec, fields, where) for where, rec in records]
        return [_named_pair(path, rec, where, prompt_column, response_column) for where, rec in records]
    except CalibrationDataError as e:
        raise FinetuneDataError(str(e)) from None


def _named_pair(path, rec: dict, where: str, prompt_column: str, response_column: str) -> tuple[str, str]:
    prompt_columns = [c.strip() for c in prompt_column.split(",") if c.strip()]
    missing = [c for c in prompt_columns + [response_column] if c not in rec]
    if missing:
        raise FinetuneDataError(f"{where}: no column {', '.join(repr(c) for c in missing)} (columns found: "
                                f"{', '.join(sorted(rec))}); set --prompt_column / --response_column")
    values = [rec[c] for c in prompt_columns + [response_column]]
    if not all(isinstance(v, str) or v is None for v in values):
        raise FinetuneDataError(f"{where}: columns {prompt_columns + [response_column]} must hold strings")
    prompt = "\n".join(v for v in values[:-1] if v)
    return prompt, values[-1] or ""


def resolve_style(style: str, tokenizer, model_type: str | None, pairs: list[tuple[str, str]]) -> str:
    if style not in STYLES:
        raise FinetuneDataError(f"chat format {style!r} is not one of {', '.join(STYLES)}")
    if style != "auto":
        if style == "template" and not getattr(tokenizer, "chat_template", None):
            raise FinetuneDataError("chat format 'template' needs a tokenizer with a chat_template")
        return style
    if pairs and pairs[0][0].lstrip().startswith(chat_format.HUMAN):
        return "raw"
    if model_type == "BlueLM":
        return "bluelm"
    return "template" if getattr(tokenizer, "chat_template", None) else "plain"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_pair(tokenizer, prompt: str, response: str, style: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for one record; the response ends with the end-of-turn token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if style == "template":
        user = [{"role": "user", "content": prompt}]
        p = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                  tokenize=True, return_dict=False))
        if full[: len(p)] == p:
            return p, full[len(p):]
        # The template renders the prompt differently once the reply follows: keep inference's prompt.
        text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        return p, _encode(tokenizer, text[len(head):] if text.startswith(head) else response) + eos
    if style == "bluelm":
        return _bos(tokenizer) + _encode(tokenizer, chat_format.prompt(prompt)), _encode(tokenizer, response) + eos
    if style == "raw":
        return _bos(tokenizer) + _encode(tokenizer, prompt), _encode(tokenizer, response) + eos
    if style == "plain":
        return _bos(tokenizer) + _encode(tokenizer, prompt + "\n"), _encode(tokenizer, response) + eos
    raise FinetuneDataError(f"chat format {style!r} is not one of {', '.join(STYLES[1:])}")


def build_examples(tokenizer, pairs: list[tuple[str, str]], style: str, seq_len: int, where: str = "data") -> list[Example]:
    """Token examples of at most seq_len tokens: a long response is cut at the end, then a long
    prompt loses its beginning (the question's end stays next to the answer)."""
    if seq_len < 2:
        raise FinetuneDataError(f"seq_len={seq_len} must be at least 2")
    examples, cut, empty = [], 0, 0
    for prompt, response in pairs:
        if not response.strip():
            empty += 1
            continue
        p, r = encode_pair(tokenizer, prompt, response, style)
        if len(p) + len(r) > seq_len:
            cut += 1
            r = r[: seq_len - min(len(p), seq_len // 2)]
            p = p[len(p) - (seq_len - len(r)):] if len(p) > seq_len - len(r) else p
        examples.append(Example(p + r, [IGNORE] * len(p) + r))
    if cut:
        log.warning("%s: %d of %d records longer than seq_len=%d were cut", where, cut, len(pairs), seq_len)
    if empty:
        log.warning("%s: %d records with an empty response were skipped", where, empty)
    if not examples:
        raise FinetuneDataError(f"{where}: no record has a non-empty response to train on")
    return examples


def load_examples(path, tokenizer, model_type: str | None, seq_len: int, style: str = "auto",
                  prompt_column: str | None = None, response_column: str | None = None) -> tuple[list[Example], str]:
    """(examples, the style used) of one file."""
    pairs = read_pairs(path, prompt_column, response_column)
    style = resolve_style(style, tokenizer, model_type, pairs)
    return build_examples(tokenizer, pairs, style, seq_len, str(path)), style


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    finds its place from the count of examples seen alone."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def take(examples: list[Example], seed: int, start: int, count: int) -> list[Example]:
    """Examples start .. start+count-1 of the endless stream of shuffled epochs."""
    n = len(examples)
    out = []
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        out.append(examples[epoch_order(n, seed, epoch)[pos]])
    return out


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [B, longest]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["Example", "FinetuneDataError", "IGNORE", "STYLES", "build_examples", "collate", "encode_pair",
           "epoch_order", "load_examples", "read_pairs", "resolve_style", "take"]
