"""A model with no weights yet, and the steps that fill it from a checkpoint.

Load: config -> `build_skeleton` (parameters on the meta device) -> `swap_quant_linears`
(QuantLinear where the checkpoint has `*.qweight`, each checked against the tensors'
shapes) -> `assign_tensor` per checkpoint tensor -> `finish_quant_linear` once a
layer's tensors are all in (legacy g_idx, v2 zeros, the kernel's repack).

Used by loading.py (our loader), hf_quantizer.py (transformers' from_pretrained) and the
quantization pipeline (which builds the same skeleton from a full-precision directory).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .modeldir import ModelDir
from .nn import QuantLinear, find_linears, set_module
from .packing import convert_qzeros, pack_multiple
from .quantizer import default_g_idx
from .shards import CheckpointError, ShardReader

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def build_skeleton(model_dir: ModelDir, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device (buffers real: they are small).

    BlueLM needs bluelm_quant.auto.register_auto_classes() first (the loaders call it).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model_dir.hf_config(), dtype=dtype)


def swap_quant_linears(model: nn.Module, model_dir: ModelDir, dtype: torch.dtype) -> list[str]:
    """Replace each Linear the checkpoint holds `qweight` for by an empty (meta) QuantLinear.

    Bits and group size come from the quantization config, checked against the tensor
    shapes (the legacy layout has no group size: it is derived from the shapes).
    Returns the names of the swapped Linears.
    """
    reader, config = model_dir.reader, model_dir.require_quant()
    legacy = model_dir.layout == "legacy"
    quantized = sorted(k[: -len(".qweight")] for k in reader.keys() if k.endswith(".qweight"))
    linears = find_linears(model, exclude=())
    unknown = [n for n in quantized if n not in linears]
    if unknown:
        raise CheckpointError(f"quantized tensors for modules the model does not have: {unknown[:5]}")
    for name in quantized:
        layer = _empty_quant_linear(name, linears[name], reader, config, legacy, dtype)
        _check_shapes(name, reader, layer, g_idx_optional=legacy or config.act_order != "dynamic")
        set_module(model, name, layer)
    return quantized


def _empty_quant_linear(name, linear: nn.Linear, reader: ShardReader, config: QuantConfig, legacy: bool, dtype) -> QuantLinear:
    k, n, bits = linear.in_features, linear.out_features, config.bits
    qrows = reader.shape(f"{name}.qweight")[0]
    if qrows * 32 != k * bits:
        raise CheckpointError(
            f"{name}.qweight has {qrows} rows: {qrows * 32 / k:g} bits per weight for in_features={k}, "
            + (f"but the config says bits={bits}" if not legacy else
               f"but the legacy layout (no quantization config) is read as bits={bits} (config.json's "
               "quantization_bit, 4 when it has none); add quantize_config.json with the right bits")
        )
    if k % pack_multiple(bits) or n % pack_multiple(bits):
        raise CheckpointError(f"{name}: in_features={k}, out_features={n} are not multiples of {pack_multiple(bits)}")
    group_size = _group_size(name, k, reader.shape(f"{name}.scales")[0], config, legacy)
    return QuantLinear(k, n, bits, group_size, bias=f"{name}.bias" in reader, dtype=dtype, device="meta")


def _group_size(name: str, in_features: int, groups: int, config: QuantConfig, legacy: bool) -> int:
    """Group size from the scales rows; checked against the config when it has one."""
    if groups == 1:
        return -1
    if legacy:
        if in_features % groups:
            raise CheckpointError(
                f"{name}.scales has {groups} rows, which fits no group size for in_features={in_features} "
                "(the legacy layout needs in_features / rows to be a whole number)"
            )
        return in_features // groups
    expected = config.groups(in_features)
    if groups != expected:
        raise CheckpointError(
            f"{name}.scales has {groups} rows but the quantization config says group_size={config.group_size}, "
            f"which gives {expected} groups for in_features={in_features}; the config disagrees with the tensors"
        )
    return config.group_size


def _check_shapes(name: str, reader: ShardReader, layer: QuantLinear, g_idx_optional: bool) -> None:
    """g_idx_optional: the legacy layout has none, and without dynamic act-order (off, or static:
    groups fixed before reordering) the default order (column i in group i // group_size) is what
    the config means; finish_quant_linear builds it."""
    for suffix in QUANT_SUFFIXES + (("bias",) if layer.bias is not None else ()):
        key = f"{name}.{suffix}"
        if key not in reader:
            if suffix == "g_idx" and g_idx_optional:
                continue
            if suffix == "g_idx":
                raise CheckpointError(
                    f"tensor {key} is missing, but the quantization config says desc_act=true (dynamic act-order): "
                    "without g_idx the group of each input column is unknown and the model would output "
                    "garbage. Re-export the checkpoint with its g_idx tensors"
                )
            raise CheckpointError(f"tensor {key} is missing from the checkpoint")
        got, want = reader.shape(key), tuple(getattr(layer, suffix).shape)
        if got != want:
            raise CheckpointError(
                f"tensor {key} has shape {list(got)}, expected {list(want)} for a {layer.bits}-bit layer "
                f"with in_features={layer.in_features}, out_features={layer.out_features}, "
                f"group_size={layer.group_size}; the checkpoint does not fit its config"
            )


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Set the parameter or buffer `key` (dotted, relative to `model`) to `tensor`."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        del old
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"{key}: the model has no parameter or buffer of that name")


def materialize(module: nn.Module, prefix: str, reader: ShardReader, device, dtype,
                aliases: dict[str, str] | None = None) -> None:
    """Give a skeleton module real parameters and persistent buffers from the source shards
    (floats converted to `dtype`), each checked against the module's shape.

    aliases: {key: stored key} for tensors a checkpoint stores once (a tied lm_head.weight
    is read from model.embed_tokens.weight)."""
    persistent = {n for n, _ in module.named_buffers()} - {
        f"{m}.{b}".lstrip(".") for m, sub in module.named_modules() for b in sub._non_persistent_buffers_set
    }
    shapes = {n: p.shape for n, p in module.named_parameters()}
    shapes.update({n: module.get_buffer(n).shape for n in sorted(persistent)})
    for name, want in shapes.items():
        key = f"{prefix}.{name}" if prefix else name
        if key not in reader and aliases and aliases.get(key) in reader:
            key = aliases[key]
        if key not in reader:
            raise CheckpointError(f"tensor {key} is missing from {reader.directory}")
        t = read_copy(reader, key, device, dtype)
        if tuple(t.shape) != tuple(want):
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, the model expects {list(want)}")
        assign_tensor(module, name, t)


def read_copy(reader: ShardReader, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A source tensor as an owned copy (floats converted to `dtype` if given); its shard
    is unmapped after the read.

    copy=True: a same-dtype .to() would alias the shard's memory map, and writing the
    quantized weight back would turn those pages into private memory that outlives the
    layer (13 GB by the last layer of a 7B model). Unmapping: a map kept open holds the
    pages read through it (90 MB per 7B layer; 2.8 GB of RSS by the last layer).
    """
    t = reader.get(key, transient=True)
    reader.release(reader.key_to_file[key])  # the map goes once `t` does
    return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def finish_quant_linear(layer: QuantLinear, g_idx_stored: bool, checkpoint_format: str) -> None:
    """A QuantLinear whose stored tensors are all assigned: fill in what the layout leaves
    implicit (the legacy layout has no g_idx; gptq_v2 stores true zeros, the kernels take
    v1), then build the kernel's layout (post_init)."""
    if not g_idx_stored:
        layer.g_idx = default_g_idx(layer.in_features, layer.group_size).to(layer.qweight.device)
    if checkpoint_format == "gptq_v2":
        layer.qzeros = convert_qzeros(layer.qzeros, layer.bits, "gptq_v2", "gptq")
    layer.post_init()


__all__ = ["QUANT_SUFFIXES", "assign_tensor", "build_skeleton", "finish_quant_linear", "materialize", "read_copy",
           "swap_quant_linears"]
