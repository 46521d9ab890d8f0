"""Save 4-bit checkpoints in the standard GPTQ layout (docs/CHECKPOINTS.md).

Written: model-0000N-of-0000M.safetensors + model.safetensors.index.json,
quantize_config.json, config.json with `quantization_config`, and the source's tokenizer
and other small files. What AutoGPTQ, GPTQModel, transformers+optimum and vLLM read.
Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory, follow_umask, write_json
from .config import QuantConfig
from .modeldir import CONFIG_FILE, QUANTIZE_CONFIG_FILE
from .nn import QuantLinear

log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
NOT_COPIED = {CONFIG_FILE, QUANTIZE_CONFIG_FILE, "model.safetensors.index.json", "pytorch_model.bin.index.json"}
DEFAULT_MAX_SHARD = 2 * 1024**3


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share another tensor (lm_head with the embedding) when the
    config ties them; checkpoints omit these and loading re-ties them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: tied duplicates dropped, scales in fp16 (the standard)."""
    tied = tied_keys(model)
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen and name in tied:
            continue  # re-tied at load time, as transformers does
        t = t.detach().to("cpu")
        if name.endswith(".scales") and t.dtype != torch.float16:
            half = t.to(torch.float16)
            if not torch.equal(half.to(t.dtype), t):
                log.warning("%s: scales are not exactly representable in fp16; saved rounded", name)
            t = half
        out[name] = t.clone() if ptr in seen else t.contiguous()
        seen.setdefault(ptr, name)
    return out


def write_shards(items: Iterable[tuple[str, torch.Tensor]], out_dir: str, max_shard_size: int = DEFAULT_MAX_SHARD) -> None:
    """Stream (name, tensor) pairs into model-0000N-of-0000M.safetensors + index.

    Only one shard's tensors are held at a time, so a 7B checkpoint can be written
    from per-layer results with bounded memory. Shards are named with a placeholder
    count first and renamed once the count is known.
    """
    names, current, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        nonlocal current, size
        fname = f"model-{len(names) + 1:05d}.partial"
        save_file(current, os.path.join(out_dir, fname), metadata={"format": "pt"})
        follow_umask(os.path.join(out_dir, fname))
        names.append((fname, list(current)))
        current, size = {}, 0

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    if current or not names:
        flush()
    for i, (partial, keys) in enumerate(names, start=1):
        fname = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        os.replace(os.path.join(out_dir, partial), os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in keys})
    write_json(os.path.join(out_dir, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})


def copy_model_files(source_dir: str, out_dir: str, skip_suffixes: tuple[str, ...] = ()) -> None:
    """Tokenizer, generation config, license... everything but weights, configs and `skip_suffixes`."""
    skip = WEIGHT_FILE_SUFFIXES + tuple(skip_suffixes)
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if not os.path.isfile(path) or name in NOT_COPIED or name.endswith(skip) or name.startswith("."):
            continue
        shutil.copy2(path, os.path.join(out_dir, name))


def write_checkpoint(model: nn.Module, out_dir: str, config: QuantConfig, max_shard_size: int = DEFAULT_MAX_SHARD) -> None:
    """Write weights, index and configs into an existing (temporary) directory."""
    write_shards(_checkpoint_tensors(model).items(), out_dir, max_shard_size)
    write_configs(out_dir, model.config.to_dict(), config)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not os.path.exists(os.path.join(out_dir, "generation_config.json")):
        gen.save_pretrained(out_dir)


def write_configs(out_dir: str, hf_config: dict, config: QuantConfig) -> None:
    """quantize_config.json, and config.json carrying quantization_config."""
    write_json(os.path.join(out_dir, QUANTIZE_CONFIG_FILE), config.to_dict())
    hf_config = dict(hf_config, quantization_config=config.to_dict())
    write_json(os.path.join(out_dir, CONFIG_FILE), hf_config)


def save_quantized(
    model: nn.Module,
    out_dir: str,
    config: QuantConfig,
    *,
    source_dir: str | None = None,
    tokenizer=None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
) -> str:
    """Save a model whose Linears are QuantLinear; atomic (temp dir + rename)."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model has no QuantLinear layer; quantize it before saving")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if source_dir:
            copy_model_files(source_dir, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_checkpoint(model, tmp, config, max_shard_size)
    return out_dir


__all__ = ["DEFAULT_MAX_SHARD", "copy_model_files", "save_quantized", "tied_keys", "write_checkpoint", "write_configs", "write_shards"]
