"""Rewrite an existing 4-bit checkpoint into the standard GPTQ layout that vLLM, GPTQModel and
transformers load (docs/CHECKPOINTS.md), when that is lossless.

What changes:
  - the legacy BlueLM-7B-Chat-4bits layout (.bin shards, no quantization config, fp32 scales,
    no g_idx): safetensors shards, scales in 16 bits (the rounding is measured and reported),
    g_idx written, `quantization_config` in config.json and quantize_config.json;
  - v2 ("gptq_v2", true zeros) -> v1 zeros, exactly;
  - act-order with a monotone g_idx (static groups) -> `desc_act: false`, which is what that
    layout is: vLLM refuses `desc_act: true`;
  - unquantized tensors and config.json's dtype in 16 bits (vLLM's GPTQ path runs fp16/bf16);
  - the source's remote code (config.json auto_map, *.py files) is left out: it was written for
    the source's layout and kernel; transformers (after `import bluelm_quant`) and vLLM (the
    plugin) run BlueLM natively.
What cannot be lossless is refused with the reason: a dynamic act-order layout (a permuted
g_idx: the standard order of qweight's rows is not groups of consecutive rows, and vLLM
ignores g_idx), or partial groups.

The source is only read; the output is written to a temporary directory and renamed into place.
An output that is, is inside or contains the source, and an --overwrite of a directory that is
not a checkpoint, are refused (outputs.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

from .atomic import atomic_directory
from .config import QuantConfig
from .engines import engine_notes
from .modeldir import CONFIG_FILE, ModelDir
from .outputs import check_not_source, check_replaceable
from .packing import convert_qzeros, unpack_qzeros
from .quantizer import default_g_idx
from .saving import DEFAULT_MAX_SHARD, copy_model_files, write_configs, write_shards
from .shards import CheckpointError

log = logging.getLogger(__name__)

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(CheckpointError):
    """The checkpoint cannot be rewritten into the standard layout without changing the model."""


@dataclass
class ConversionReport:
    source_layout: str
    config: QuantConfig
    dtype: torch.dtype
    layers: int = 0
    scale_max_rel_error: float = 0.0  # largest |16-bit scale - original| / |original|
    scales_changed: int = 0  # scales whose 16-bit value differs from the original
    notes: list[str] = field(default_factory=list)  # what vLLM or another engine still refuses, and why

    def summary(self) -> str:
        lines = [f"converted {self.layers} quantized layers from the {self.source_layout} layout; "
                 f"{self.config.bits}-bit, group size {self.config.group_size}, "
                 f"{'symmetric' if self.config.sym else 'asymmetric'}, dtype {str(self.dtype).replace('torch.', '')}"]
        if self.scales_changed:
            lines.append(f"scales rounded to 16 bits: {self.scales_changed} changed, largest relative error "
                         f"{self.scale_max_rel_error:.2e}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def target_dtype(model_dir: ModelDir, requested: str | None) -> torch.dtype:
    """The 16-bit dtype of the output: the one asked for, else the source's if it is 16-bit, else bfloat16."""
    if requested is not None:
        if requested not in DTYPES:
            raise ConversionError(f"dtype {requested!r}: use float16 or bfloat16 (vLLM's GPTQ path runs only these)")
        return DTYPES[requested]
    source = model_dir.dtype
    return source if source in DTYPES.values() else torch.bfloat16


def convert(source: str, out: str, dtype: str | None = None, overwrite: bool = False,
            max_shard_size: int = DEFAULT_MAX_SHARD) -> ConversionReport:
    """Rewrite the checkpoint at `source` into the standard layout at `out` (see the module docstring)."""
    model_dir = ModelDir(source)
    check_not_source(model_dir.path, out)
    if overwrite and os.path.lexists(out):
        check_replaceable(out)  # a checkpoint or an empty directory, never the user's other files
    config = model_dir.require_quant()
    modules = sorted({k.rpartition(".")[0] for k in model_dir.reader.keys() if k.endswith(".qweight")})
    report = ConversionReport(model_dir.layout, config, target_dtype(model_dir, dtype))
    plan = _plan(model_dir, modules, report)
    report.config = plan
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_shards(_tensors(model_dir, modules, plan, report), tmp, max_shard_size)
        # The source's remote code (auto_map, *.py) was written for its own layout and kernel.
        copy_model_files(model_dir.path, tmp, skip_suffixes=(".py",))
        hf = {k: v for k, v in model_dir.config.items()
              if k not in ("quantization_config", "quantization_bit", "auto_map", "torch_dtype", "dtype")}
        hf["torch_dtype"] = str(report.dtype).replace("torch.", "")
        write_configs(tmp, hf, plan)
    model_dir.close()
    report.notes += engine_notes(plan)
    return report


def _plan(model_dir: ModelDir, modules: list[str], report: ConversionReport) -> QuantConfig:
    """The output's QuantConfig, after checking that every layer converts losslessly."""
    reader, config = model_dir.reader, model_dir.quant
    group_sizes = set()
    for name in modules:
        k = reader.shape(f"{name}.qweight")[0] * 32 // config.bits
        rows = reader.shape(f"{name}.scales")[0]
        if rows == 1:
            gs = -1
        elif k % rows:
            raise ConversionError(f"{name}: {rows} scale rows do not split in_features={k} into equal groups")
        else:
            gs = k // rows
        if model_dir.layout != "legacy" and gs not in (-1, config.group_size) and k % config.group_size:
            raise ConversionError(
                f"{name}: in_features={k} is not a multiple of group_size={config.group_size} (a partial last "
                "group); vLLM drops or refuses partial groups, so no standard rewrite serves this checkpoint - "
                "re-quantize it with a group size that divides every in_features"
            )
        group_sizes.add(gs)
        _check_g_idx(model_dir, name, k, gs)
    if len(group_sizes) != 1:
        raise ConversionError(f"the quantized layers use different group sizes {sorted(group_sizes)}; "
                              "a checkpoint with one group size is needed")
    sym = _zeros_are_symmetric(model_dir, modules, config.bits)
    return dataclasses.replace(config, group_size=group_sizes.pop(), sym=sym, checkpoint_format="gptq",
                               static_groups=config.desc_act or config.static_groups, dynamic={})


def _check_g_idx(model_dir: ModelDir, name: str, k: int, gs: int) -> None:
    key = f"{name}.g_idx"
    if key not in model_dir.reader:
        return  # legacy: groups are consecutive rows by definition
    g_idx = model_dir.reader.get(key).to(torch.int64)
    if not torch.equal(g_idx, default_g_idx(k, gs).to(torch.int64)):
        raise ConversionError(
            f"{name}.g_idx is not k // group_size: a dynamic act-order layout (groups follow the quantization "
            "order). It cannot be rewritten losslessly into a layout vLLM serves (vLLM ignores g_idx and refuses "
            "desc_act); load it with bluelm_quant.load_quantized, or re-quantize with static act-order "
            "(the default of tools/quantize.py)"
        )


def _zeros_are_symmetric(model_dir: ModelDir, modules: list[str], bits: int) -> bool:
    """True when every stored zero is the symmetric midpoint (what vLLM assumes without reading qzeros)."""
    fmt = "gptq_v2" if model_dir.layout == "gptq_v2" else "gptq"
    mid = 2 ** (bits - 1)
    return all(bool((unpack_qzeros(model_dir.reader.get(f"{m}.qzeros").to(torch.int32), bits, fmt) == mid).all())
               for m in modules)


def _tensors(model_dir: ModelDir, modules: list[str], plan: QuantConfig, report: ConversionReport):
    """(name, tensor) of the output, one source shard at a time."""
    reader, dtype = model_dir.reader, report.dtype
    quantized = set(modules)
    for file, keys in reader.keys_by_file().items():
        for key in keys:
            module, _, suffix = key.rpartition(".")
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a cache 2023-era code saved; models recompute it
            t = reader.get(key, transient=True)
            if module in quantized and suffix in SUFFIXES:
                yield from _quantized_tensor(model_dir, module, suffix, t, plan, report)
            elif t.is_floating_point():
                yield key, t.to(dtype)
            else:
                yield key, t
        reader.release(file)


def _quantized_tensor(model_dir: ModelDir, module: str, suffix: str, t: torch.Tensor, plan: QuantConfig,
                      report: ConversionReport):
    if suffix == "qweight":
        report.layers += 1
        if f"{module}.g_idx" not in model_dir.reader:  # written right after qweight
            k = t.shape[0] * 32 // plan.bits
            yield f"{module}.qweight", t.to(torch.int32)
            yield f"{module}.g_idx", default_g_idx(k, plan.group_size)
            return
        yield f"{module}.qweight", t.to(torch.int32)
    elif suffix == "qzeros":
        z = t.to(torch.int32)
        yield f"{module}.qzeros", convert_qzeros(z, plan.bits, "gptq_v2", "gptq") if model_dir.layout == "gptq_v2" else z
    elif suffix == "scales":
        half = t.to(torch.float16)  # the ecosystem's scale dtype, whatever the model's
        wide = t.double()
        changed = half.double() != wide
        if changed.any():
            rel = ((half.double() - wide).abs() / wide.abs().clamp_min(1e-30))[changed]
            report.scales_changed += int(changed.sum())
            report.scale_max_rel_error = max(report.scale_max_rel_error, float(rel.max()))
        yield f"{module}.scales", half
    elif suffix == "g_idx":
        yield f"{module}.g_idx", t.to(torch.int32)
    else:
        yield f"{module}.bias", t.to(report.dtype)


__all__ = ["ConversionError", "ConversionReport", "convert"]
