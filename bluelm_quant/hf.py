"""Hugging Face glue: open any model directory bluelm-quant knows, with its tokenizer.

`load_model_and_tokenizer(path)` takes a full-precision directory, a standard GPTQ one
(quantize_config.json or config.json `quantization_config`), or the legacy
BlueLM-7B-Chat-4bits one (no quantization config at all: only its `*.qweight` tensors say
it is 4-bit), and checks that the tokenizer fits the checkpoint's embedding.

`enable()` / `disable()` / `enabled()` (from hf_quantizer.py) route transformers' own
`from_pretrained` on GPTQ checkpoints through bluelm-quant.
"""
from __future__ import annotations

import logging

import torch

from .auto import register_auto_classes
from .hf_quantizer import BlueLMQuantHfQuantizer, disable, enable, enabled, is_enabled
from .loading import load_quantized
from .modeldir import ModelDir
from .shards import CheckpointError

log = logging.getLogger(__name__)

# Checkpoints pad the embedding past the tokenizer so its row count is a multiple of 8..128
# (BlueLM: 100002 tokens -> 100008 rows, 100004 -> 100096). More than that is not padding.
EMBEDDING_PAD_MULTIPLE = 128


def is_quantized_dir(path: str) -> bool:
    """True for a GPTQ directory, including the legacy layout that names no quantization config."""
    try:
        return ModelDir(path).is_quantized
    except CheckpointError:
        return False


def tokenizer_vocab_mismatch(rows: int, tokenizer) -> str | None:
    """Why a checkpoint with `rows` embedding rows does not fit `tokenizer`, or None if it does.

    Fits: rows >= len(tokenizer) (base vocabulary + added tokens), with at most the padding up to
    the next multiple of EMBEDDING_PAD_MULTIPLE beyond it. The published configs' vocab_size is not
    compared: it disagrees with BlueLM's own tensors (100096 vs 100008).
    """
    total, base = len(tokenizer), tokenizer.vocab_size
    added = total - base
    sizes = f"the tokenizer has {total} tokens ({base} in its base vocabulary + {added} added)"
    if rows < base:
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: even the base vocabulary does not fit, "
                "so the tokenizer belongs to another model; copy the tokenizer files of this checkpoint")
    if rows < total:
        missing = [str(tokenizer.convert_ids_to_tokens(i)) for i in range(rows, total)]
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: ids {rows}..{total - 1} "
                f"({', '.join(missing)}) have no embedding row and fail if used; "
                "remove those added tokens or use this checkpoint's tokenizer files")
    padded = -(-total // EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    if rows > padded:
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: ids {total}..{rows - 1} have no token "
                f"(more than padding to a multiple of {EMBEDDING_PAD_MULTIPLE}); the tokenizer may belong to "
                "another model")
    return None


def load_model_and_tokenizer(path: str, device="cpu", dtype: torch.dtype | None = None, lm_head_bits: int = 16):
    """(model, tokenizer) from a local directory, full precision or 4-bit, in eval mode.

    The tokenizer is loaded first so a missing tokenizer.model fails before gigabytes of weights
    are read. dtype: compute dtype (default: the config's torch_dtype). lm_head_bits: 8 or 4
    quantize a 4-bit checkpoint's lm_head at load time (load_quantized).
    """
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    model_dir = ModelDir(path)
    if lm_head_bits != 16 and not model_dir.is_quantized:
        raise ValueError(f"lm_head_bits={lm_head_bits}: {path} is a full-precision model; a quantized lm_head "
                         "comes with a 4-bit checkpoint only (quantize it first, or leave lm_head_bits at 16)")
    tokenizer = model_dir.load_tokenizer()
    if model_dir.is_quantized:
        model = load_quantized(model_dir, device=device, dtype=dtype, lm_head_bits=lm_head_bits)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=model_dir.hf_config(), dtype=dtype or "auto")
        except OSError as e:  # transformers' way of saying the weight files are missing or unreadable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load the weights of {path}: {first}") from e
        model = model.to(device).eval()
    problem = tokenizer_vocab_mismatch(model.get_input_embeddings().num_embeddings, tokenizer)
    if problem:
        log.warning("%s: %s", path, problem)
    return model, tokenizer


__all__ = ["BlueLMQuantHfQuantizer", "EMBEDDING_PAD_MULTIPLE", "disable", "enable", "enabled", "is_enabled",
           "is_quantized_dir", "load_model_and_tokenizer", "tokenizer_vocab_mismatch"]
