"""Base model + LoRA adapter -> one full-precision Hugging Face checkpoint (optionally re-quantized).

A 4-bit layer cannot absorb an adapter: W + scaling * B @ A has no place on the old grid.
So the merged model is written in full precision: each adapted layer's weight is the
dequantized 4-bit weight plus the adapter's update (computed in float32, then stored in
`dtype`), every other tensor is copied. The result is a plain checkpoint any tool loads;
`requantize` then runs our GPTQ on it, giving a 4-bit checkpoint that serves wherever
the base one did (vLLM, transformers) with no adapter at run time.

Layers are merged and written one at a time (saving.write_shards streams shards), so
memory holds the 4-bit model plus one shard, never the whole full-precision model.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch
from torch import nn

from .atomic import atomic_directory, write_json
from .modeldir import CONFIG_FILE, ModelDir
from .nn import QuantLinear
from .saving import DEFAULT_MAX_SHARD, copy_model_files, tied_keys, write_shards

log = logging.getLogger(__name__)


def merged_weight(layer: nn.Module, adapters: list[str] | None = None) -> torch.Tensor:
    """Full-precision weight [out, in] in float32 of a Linear, a QuantLinear, or a PEFT LoRA layer
    around either (its active adapters' updates added, or those named in `adapters`)."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        base = layer.get_base_layer()
        w = merged_weight(base)
        for name in adapters if adapters is not None else layer.active_adapters:
            if name in layer.lora_A:
                w = w + layer.get_delta_weight(name).float().to(w.device)
        return w
    if isinstance(layer, QuantLinear):
        return layer.dequantize(torch.float32)
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    raise TypeError(f"cannot merge a {type(layer).__name__}")


def merged_tensors(peft_model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the merged full-precision checkpoint, one layer at a time, in `dtype`."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    merged_prefixes = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in merged_prefixes):
            continue
        if isinstance(m, (LoraLayer, QuantLinear)):
            merged_prefixes.append(name + ".")
            yield f"{name}.weight", merged_weight(m).to(dtype).cpu()
            base = m.get_base_layer() if isinstance(m, LoraLayer) else m
            if getattr(base, "bias", None) is not None:
                yield f"{name}.bias", base.bias.detach().to(dtype).cpu()
    tied = tied_keys(model)
    for name, t in model.state_dict().items():
        if any(name.startswith(p) for p in merged_prefixes) or name in tied:
            continue
        yield name, (t.detach().to(dtype) if t.is_floating_point() else t.detach()).cpu().contiguous()


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str, dtype: torch.dtype | None = None,
                  overwrite: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD) -> str:
    """Write base + adapter as a full-precision HF directory at out_dir (atomically); returns out_dir.

    dtype: of the written weights (default: the base config's torch_dtype)."""
    from .loading import load_quantized
    from .lora import load_adapter

    model_dir = ModelDir(base_dir)
    dtype = dtype or model_dir.dtype
    if model_dir.is_quantized:
        model = load_quantized(model_dir, device="cpu", dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, config=model_dir.hf_config(), dtype=torch.float32).eval()
    peft_model = load_adapter(model, adapter_dir)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    config["dtype"] = config["torch_dtype"]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        copy_model_files(base_dir, tmp)
        with torch.no_grad():
            write_shards(merged_tensors(peft_model, dtype), tmp, max_shard_size)
        write_json(os.path.join(tmp, CONFIG_FILE), config)
        write_json(os.path.join(tmp, "merge_source.json"), {"base": os.path.abspath(base_dir), "adapter": os.path.abspath(adapter_dir)})
    return out_dir


def requantize(merged_dir: str, out_dir: str, base_dir: str, calib=None, opts=None) -> dict:
    """GPTQ on the merged model with the base checkpoint's quantization settings; the pipeline's report."""
    from .pipeline import quantize

    config = ModelDir(base_dir).quant
    if config is None:
        raise ValueError(f"{base_dir} is not a quantized checkpoint: pass the quantization settings to bluelm-quantize instead")
    return quantize(merged_dir, out_dir, config, calib, opts)


__all__ = ["merge_adapter", "merged_tensors", "merged_weight", "requantize"]
