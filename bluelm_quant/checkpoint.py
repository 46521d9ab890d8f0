"""Save and load 4-bit checkpoints.

Saved layout (what GPTQModel / AutoGPTQ / transformers+optimum / vLLM read):
  model-0000N-of-0000M.safetensors + model.safetensors.index.json
  quantize_config.json, config.json with `quantization_config`, tokenizer files.
Loaded layouts: that one (v1 or v2 zeros), and the legacy BlueLM-7B-Chat-4bits one
(`pytorch_model-*.bin` shards, qweight/qzeros/scales only, fp32 scales, group size
derived from the tensor shapes).

Loading never materializes a full-precision Linear weight: the skeleton is built with
parameters on the meta device and tensors are streamed shard by shard to `device`,
each converted on the CPU and moved once; QuantLinears are repacked per layer.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import traceback
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory, write_json
from .config import QuantConfig, QuantConfigError
from .nn import QuantLinear, find_linears, set_module
from .packing import convert_qzeros, pack_multiple
from .placement import CPUEmbedding, DeviceError, DeviceMemoryError, Int8Linear, check_dtype, resolve_device
from .quantizer import default_g_idx
from .shards import CheckpointError, ShardReader

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
NOT_COPIED = {"config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
# Buffers that old checkpoints carry but models recompute (legacy RoPE caches).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD = 2 * 1024**3


# --- save -------------------------------------------------------------------------------


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


def copy_model_files(source_dir: str, out_dir: str) -> None:
    """Tokenizer, generation config, license... everything but weights and configs."""
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if not os.path.isfile(path) or name in NOT_COPIED or name.endswith(WEIGHT_FILE_SUFFIXES) or name.startswith("."):
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
    write_json(os.path.join(out_dir, "quantize_config.json"), config.to_dict())
    hf_config = dict(hf_config, quantization_config=config.to_dict())
    write_json(os.path.join(out_dir, "config.json"), hf_config)


def save_quantized(
    model: nn.Module,
    out_dir: str,
    config: QuantConfig,
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


# --- load -------------------------------------------------------------------------------


def read_quant_config(path: str, reader: ShardReader | None = None) -> tuple[QuantConfig, bool]:
    """(config, legacy). Order: quantize_config.json, config.json quantization_config,
    then the legacy layout (tensors only; bits and group size from shapes)."""
    qc_path = os.path.join(path, "quantize_config.json")
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(qc_path):
        return QuantConfig.load(qc_path), False
    with open(cfg_path, encoding="utf-8") as f:
        hf = json.load(f)
    if isinstance(hf.get("quantization_config"), dict):
        return QuantConfig.from_dict(hf["quantization_config"], source=f"{cfg_path} quantization_config"), False
    reader = reader or ShardReader(path)
    if not any(k.endswith(".qweight") for k in reader.keys()):
        raise CheckpointError(
            f"{path} is not a quantized checkpoint: no quantize_config.json, no quantization_config "
            "in config.json and no *.qweight tensors. Load it with transformers, or quantize it first"
        )
    bits = hf.get("quantization_bit", hf.get("bits", 4))
    return QuantConfig(bits=int(bits), group_size=-1, sym=False), True


def _infer_group_size(name: str, in_features: int, groups: int, config: QuantConfig, legacy: bool) -> int:
    """Group size from the scales rows; checked against the config when it has one."""
    if groups == 1:
        gs = -1
    elif legacy:
        if in_features % groups:
            raise CheckpointError(
                f"{name}.scales has {groups} rows, which fits no group size for in_features={in_features} "
                "(the legacy layout needs in_features / rows to be a whole number)"
            )
        gs = in_features // groups
    else:
        gs = config.group_size
        expected = config.groups(in_features)
        if groups != expected:
            raise CheckpointError(
                f"{name}.scales has {groups} rows but quantize_config says group_size={config.group_size}, "
                f"which gives {expected} groups for in_features={in_features}; the config disagrees with the tensors"
            )
    return gs


def _check_shapes(name: str, reader: ShardReader, layer: QuantLinear) -> None:
    for suffix in QUANT_SUFFIXES + (("bias",) if layer.bias is not None else ()):
        key = f"{name}.{suffix}"
        if key not in reader:
            if suffix == "g_idx":
                continue
            raise CheckpointError(f"tensor {key} is missing from the checkpoint")
        got, want = reader.shape(key), tuple(getattr(layer, suffix).shape)
        if got != want:
            raise CheckpointError(
                f"tensor {key} has shape {list(got)}, expected {list(want)} for a {layer.bits}-bit layer "
                f"with in_features={layer.in_features}, out_features={layer.out_features}, "
                f"group_size={layer.group_size}; the checkpoint does not fit its config"
            )


def build_skeleton(path: str, dtype: torch.dtype, reader: ShardReader):
    """The model with parameters on the meta device (buffers real, they are small)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import models  # noqa: F401  (registers BlueLM with the Auto classes)

    hf_config = AutoConfig.from_pretrained(path)
    for key in reader.keys():
        if key.endswith("embed_tokens.weight"):
            rows = reader.shape(key)[0]
            if getattr(hf_config, "vocab_size", rows) != rows:
                log.warning("config vocab_size=%s but %s has %d rows; using the checkpoint's", hf_config.vocab_size, key, rows)
                hf_config.vocab_size = rows
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # we load the quantized layers ourselves
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def _swap_quantized_linears(model, reader: ShardReader, config: QuantConfig, legacy: bool, dtype) -> list[str]:
    quantized = {k[: -len(".qweight")] for k in reader.keys() if k.endswith(".qweight")}
    linears = find_linears(model, exclude=())
    unknown = sorted(quantized - set(linears))
    if unknown:
        raise CheckpointError(f"quantized tensors for modules the model does not have: {unknown[:5]}")
    for name in sorted(quantized):
        linear = linears[name]
        k, n = linear.in_features, linear.out_features
        qrows = reader.shape(f"{name}.qweight")[0]
        bits = config.bits
        if qrows * 32 != k * bits:
            implied = qrows * 32 / k
            raise CheckpointError(
                f"{name}.qweight has {qrows} rows: {implied:g} bits per weight for in_features={k}, "
                f"but the config says bits={bits}"
            )
        if k % pack_multiple(bits) or n % pack_multiple(bits):
            raise CheckpointError(f"{name}: in_features={k}, out_features={n} are not multiples of {pack_multiple(bits)}")
        groups = reader.shape(f"{name}.scales")[0]
        gs = _infer_group_size(name, k, groups, config, legacy)
        layer = QuantLinear(k, n, bits, gs, bias=f"{name}.bias" in reader, dtype=dtype, device="meta")
        _check_shapes(name, reader, layer)
        set_module(model, name, layer)
    return sorted(quantized)


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


def _config_dtype(path: str) -> torch.dtype:
    """config.json's torch_dtype (or transformers 5's dtype); fp16 when it names none."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    named = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    dtype = getattr(torch, str(named).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}/config.json names torch_dtype={named!r}, which is not a torch dtype")
    return dtype


class _Plan:
    """Where each checkpoint tensor goes, and what the device must hold in the end."""

    def __init__(self, model, reader: ShardReader, quantized: list[str], dtype, device, embed_on_cpu: bool, lm_head_bits: int):
        self.dtype, self.device = dtype, device
        self.embed_on_cpu, self.lm_head_bits = embed_on_cpu, lm_head_bits
        names = {id(m): n for n, m in model.named_modules()}
        self.embed_key = names[id(model.get_input_embeddings())] + ".weight"
        head = model.get_output_embeddings()
        self.head_key = names[id(head)] + ".weight" if head is not None else None
        self.tie = bool(getattr(model.config, "tie_word_embeddings", False))
        # lm_head is built from the embedding table (tied checkpoints drop the duplicate)
        self.tied = self.tie and self.head_key not in reader
        # Quantized layers are repacked as soon as their last tensor arrives.
        self.pending = {
            name: {f"{name}.{s}" for s in QUANT_SUFFIXES + ("bias",) if f"{name}.{s}" in reader} for name in quantized
        }
        self.layer_of = {key: name for name, keys in self.pending.items() for key in keys}

    def device_bytes(self, reader: ShardReader, keys) -> int:
        """What the loaded model will hold on `device` (kernel repacks not included)."""
        fsize = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for key in keys:
            numel = 1
            for d in reader.shape(key):
                numel *= d
            fp = reader.dtype(key).is_floating_point
            size = numel * (fsize if fp else 4)
            if key == self.embed_key:
                head = 0
                if self.tied:
                    rows = reader.shape(key)[0]
                    head = numel + rows * fsize if self.lm_head_bits == 8 else size
                total += (0 if self.embed_on_cpu else size) + (head if (self.embed_on_cpu or self.lm_head_bits == 8) else 0)
            elif key == self.head_key and self.lm_head_bits == 8:
                total += numel + reader.shape(key)[0] * fsize
            else:
                total += size
        return total


def _convert(key: str, t: torch.Tensor, dtype, config: QuantConfig) -> torch.Tensor:
    """Checkpoint tensor -> the dtype the model keeps, on the CPU (no second device copy)."""
    if key.endswith(".qzeros") and config.checkpoint_format == "gptq_v2":
        t = convert_qzeros(t, config.bits, "gptq_v2", "gptq")
    if t.is_floating_point():
        return t.to(dtype)
    if key.endswith(("qweight", "qzeros", "g_idx")):
        return t.to(torch.int32)
    return t


def _finish_layer(model, name: str, device) -> None:
    """All of a QuantLinear's tensors are here (on the CPU): repack, then move it whole.

    Repacking on the CPU means the device never holds the unpacked temporaries of an
    act-order repack, only the final buffers.
    """
    layer = model.get_submodule(name)
    if layer.g_idx.is_meta:  # legacy layout: contiguous groups
        layer.g_idx = default_g_idx(layer.in_features, layer.group_size)
    layer.post_init()
    layer.to(device)


def _place(model, plan: _Plan, key: str, t: torch.Tensor) -> None:
    """Put one converted CPU tensor where the plan says."""
    device = plan.device
    if key in plan.layer_of:
        name = plan.layer_of[key]
        assign_tensor(model, key, t)
        plan.pending[name].discard(key)
        if not plan.pending[name]:
            _finish_layer(model, name, device)
        return
    if key == plan.embed_key and (plan.embed_on_cpu or (plan.tied and plan.lm_head_bits == 8)):
        if plan.tied:
            _set_head(model, plan, t)
        if plan.embed_on_cpu:
            old = model.get_input_embeddings()
            model.set_input_embeddings(CPUEmbedding(t, getattr(old, "padding_idx", None), device))
            return
    if key == plan.head_key and plan.lm_head_bits == 8:
        _set_head(model, plan, t)
        return
    assign_tensor(model, key, t.to(device))


def _set_head(model, plan: _Plan, weight: torch.Tensor) -> None:
    """The output projection from `weight` (its own tensor, int8 or a device copy)."""
    head = model.get_output_embeddings()
    if plan.lm_head_bits == 8:
        if getattr(head, "bias", None) is not None:
            raise CheckpointError("lm_head_bits=8 supports an lm_head without bias only")
        model.set_output_embeddings(Int8Linear.from_weight(weight, plan.dtype, plan.device))
    else:
        head.weight = nn.Parameter(weight.to(plan.device), requires_grad=False)


def _oom_message(path: str, plan: _Plan, needed: int, loaded: int | None, free: int, total: int) -> str:
    gib = 1024**3
    where = f" ({loaded / gib:.2f} GiB of it loaded when the allocation failed)" if loaded is not None else ""
    hints = []
    if not plan.embed_on_cpu:
        hints.append("embed_on_cpu=True (keeps the embedding table in host memory)")
    if plan.lm_head_bits != 8:
        hints.append("lm_head_bits=8 (halves the lm_head)")
    hints.append("freeing GPU memory held by other processes, or device='cpu'")
    return (
        f"not enough memory on {plan.device} to load {path}: the model needs about {needed / gib:.2f} GiB there"
        f"{where}; {free / gib:.2f} GiB of {total / gib:.2f} GiB are free now. Try " + ", ".join(hints)
    )


def load_quantized(
    path: str,
    device="cpu",
    dtype: torch.dtype | None = None,
    *,
    embed_on_cpu: bool = False,
    lm_head_bits: int = 16,
    allow_dtype_fallback: bool = False,
) -> nn.Module:
    """Load a 4-bit checkpoint directory into an eval-mode model on `device`.

    dtype: the compute dtype of the non-quantized weights, scales and activations
    (default: config.json's torch_dtype, fp16 when it names none). A dtype the device
    cannot run (bf16 before Ampere) is an error, or fp16 (CUDA) / fp32 (CPU) with
    allow_dtype_fallback=True.
    embed_on_cpu: keep the token-embedding table in host memory (CPUEmbedding).
    lm_head_bits: 16 keeps lm_head in `dtype`; 8 stores it as int8 with per-row scales.

    Tensors stream shard by shard into a meta-device skeleton; each is converted on the
    CPU and moved once, and each QuantLinear is repacked for the kernel on the CPU as
    soon as its tensors are in, then moved. Device memory peaks near the final size.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face model directory")
    device = resolve_device(device)
    if lm_head_bits not in (8, 16):
        raise ValueError(f"lm_head_bits={lm_head_bits!r}: use 16 (lm_head in the compute dtype) or 8 (int8 per-row)")
    reader = ShardReader(path)
    config, legacy = read_quant_config(path, reader)
    source = "dtype" if dtype is not None else f"{path}/config.json torch_dtype"
    dtype = check_dtype(device, dtype if dtype is not None else _config_dtype(path), allow_dtype_fallback, source)
    model = build_skeleton(path, dtype, reader)
    quantized = _swap_quantized_linears(model, reader, config, legacy, dtype)
    plan = _Plan(model, reader, quantized, dtype, device, embed_on_cpu, lm_head_bits)
    expected = set(model.state_dict())
    wanted = [k for k in reader.keys() if k in expected]
    needed = plan.device_bytes(reader, wanted) if device.type == "cuda" else 0
    if device.type == "cuda" and needed > torch.cuda.mem_get_info(device)[0]:
        raise DeviceMemoryError(_oom_message(path, plan, needed, None, *torch.cuda.mem_get_info(device)))
    try:
        loaded = _stream(model, reader, plan, config, expected)
    except torch.OutOfMemoryError as e:
        allocated = torch.cuda.memory_allocated(device)
        traceback.clear_frames(e.__traceback__)  # the frames' locals hold device tensors
        del model
        gc.collect()
        torch.cuda.empty_cache()
        raise DeviceMemoryError(_oom_message(path, plan, needed, allocated, *torch.cuda.mem_get_info(device))) from None
    finally:
        reader.close()
    tied = tied_keys(model)
    missing = sorted(k for k in expected - loaded if not (k.endswith(".g_idx") or k in tied))
    if missing:
        raise CheckpointError(f"the checkpoint at {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    unfinished = sorted(n for n, keys in plan.pending.items() if keys)
    if unfinished:
        raise CheckpointError(f"quantized layers left incomplete after reading {path}: {unfinished[:5]}")
    if plan.tie and not (embed_on_cpu or lm_head_bits == 8):
        model.tie_weights()  # one table for both; the memory savers need them apart
    model.to(device)  # the small buffers built on the CPU (RoPE tables); loaded tensors stay put
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors left unloaded after reading {path}: {still_meta[:5]}")
    model.quant_config = config
    return model.eval()


def _transient(key: str, reader: ShardReader, plan: _Plan, config: QuantConfig) -> bool:
    """Whether the stored tensor is dropped after reading (moved, converted or quantized)."""
    if plan.device.type != "cpu" or (key == plan.head_key and plan.lm_head_bits == 8):
        return True
    stored = reader.dtype(key)
    if stored.is_floating_point:
        return stored != plan.dtype
    return stored != torch.int32 or (key.endswith(".qzeros") and config.checkpoint_format == "gptq_v2")


def _stream(model, reader: ShardReader, plan: _Plan, config: QuantConfig, expected: set[str]) -> set[str]:
    loaded, unexpected = set(), []
    for file, keys in reader.keys_by_file().items():
        for key in keys:
            if key.endswith(IGNORED_KEY_SUFFIXES):
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            _place(model, plan, key, _convert(key, reader.get(key, _transient(key, reader, plan, config)), plan.dtype, config))
            loaded.add(key)
        reader.release(file)
    if unexpected:
        log.warning("ignored %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    return loaded


__all__ = [
    "CheckpointError",
    "DeviceError",
    "DeviceMemoryError",
    "QuantConfigError",
    "load_quantized",
    "read_quant_config",
    "save_quantized",
]
