"""The last step of a quantization run: the finished checkpoint, streamed together.

Tensors come in the model's own order: each quantized Linear's packed tensors from its
layer file in the work directory, everything else (embeddings, norms, lm_head) from the
source shards, with the source's config.json plus `quantization_config` and its
tokenizer files beside them. One output shard is held in memory at a time.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn

from .config import QuantConfig
from .layer_job import RESULT_SUFFIXES
from .modeldir import ModelDir
from .models import ModelSpec
from .saving import copy_model_files, tied_keys, write_configs, write_shards
from .shards import CheckpointError
from .workdir import WorkDir


def assemble_checkpoint(model: nn.Module, spec: ModelSpec, source: ModelDir, work: WorkDir, config: QuantConfig,
                        max_shard_size: int) -> None:
    """Write the final checkpoint into `work.final_dir` (created here)."""
    os.makedirs(work.final_dir)
    write_shards(_tensors(model, spec, source, work), work.final_dir, max_shard_size)
    copy_model_files(source.path, work.final_dir)
    hf_config = dict(source.config)  # the source's own config (dtype, auto_map...), not the skeleton's
    hf_config.pop("quantization_config", None)
    write_configs(work.final_dir, hf_config, config)


def _tensors(model: nn.Module, spec: ModelSpec, source: ModelDir, work: WorkDir) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in state-dict order; a Linear's packed tensors replace its weight and bias."""
    layers = model.get_submodule(spec.layers)
    quantized = {f"{spec.layer_name(i)}.{n}": (i, n) for i in range(len(layers)) for n in spec.linears}
    skip = tied_keys(model)
    open_layer, handle = None, None
    for module_name, module in model.named_modules():
        if module_name in quantized:
            index, linear = quantized[module_name]
            if index != open_layer:  # layers come in order: the previous file is done
                open_layer, handle = index, work.layer_tensor_handle(index)
            stored = set(handle.keys())
            for suffix in RESULT_SUFFIXES:
                if f"{linear}.{suffix}" in stored:
                    yield f"{module_name}.{suffix}", handle.get_tensor(f"{linear}.{suffix}")
            continue
        for key in _own_state_keys(module_name, module):
            if key in source.reader:
                yield key, source.reader.get(key)
            elif key not in skip:
                raise CheckpointError(f"tensor {key} is missing from {source.path}")


def _own_state_keys(module_name: str, module: nn.Module) -> list[str]:
    """State-dict keys of a module's direct parameters and persistent buffers."""
    prefix = f"{module_name}." if module_name else ""
    names = [n for n, p in module._parameters.items() if p is not None]
    names += [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
    return [prefix + n for n in names]


__all__ = ["assemble_checkpoint"]
