"""Perplexity over non-overlapping windows, for full-precision and 4-bit models alike.

The text is tokenized once without special tokens and cut into consecutive windows of
`seqlen` tokens; a trailing partial window is dropped, as in GPTQ's wikitext2 / C4
evaluation, so every window has the same context length. Inside a window the model
predicts token t+1 from tokens 0..t: the first token of each window is context only
and is never scored, so a window contributes seqlen - 1 predictions. The result is
exp(total NLL / number of predicted tokens) over all windows, with log-softmax taken
in float32 whatever the model's dtype.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .placement import model_device


class EvaluationError(ValueError):
    """The text or the settings give nothing to score (too short a text, a window under 2 tokens)."""


def text_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """LongTensor [n, seqlen] of consecutive, non-overlapping windows of `text`."""
    if seqlen < 2:
        raise EvaluationError(f"seqlen={seqlen}: a window needs at least 2 tokens to score one")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if n == 0:
        raise EvaluationError(
            f"the text gives {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
            "use a longer text or a smaller seqlen"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise EvaluationError(f"max_windows={max_windows} must be positive (or None for all)")
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def _forward_kwargs(model) -> dict:
    # Scoring needs no KV cache; for a 7B model at seqlen 2048 it would be ~1 GB more.
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward else {}
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    return {"use_cache": False} if "use_cache" in params else {}


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> tuple[float, int]:
    """(sum of NLL in nats, number of predicted tokens) over `windows` [n, seqlen]."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size} must be positive")
    device = model_device(model)
    kwargs = _forward_kwargs(model)
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for i in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[i:i + batch_size].to(device)
        logits = _logits(model(batch, **kwargs))
        if logits.shape[:2] != batch.shape:
            raise ValueError(
                f"model returned logits of shape {tuple(logits.shape)} for input "
                f"{tuple(batch.shape)}; expected [batch, seqlen, vocab]"
            )
        # float32 so bf16/fp16 models are scored without low-precision log-softmax error.
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(),
                              reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    """Perplexity of `model` on `text` (see the module docstring for the exact definition)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        total, count = window_nll(model, text_windows(tokenizer, text, seqlen, max_windows),
                                  batch_size=batch_size, progress=progress)
    finally:
        if was_training:
            model.train()
    return math.exp(total / count)
