"""Load a 4-bit checkpoint directory straight onto its device.

Loaded layouts (docs/CHECKPOINTS.md): the standard GPTQ one with v1 or v2 zeros, and the
legacy BlueLM-7B-Chat-4bits one (`pytorch_model-*.bin` shards, qweight/qzeros/scales only,
fp32 scales, group size derived from the tensor shapes).

No full-precision Linear weight is ever materialized: the skeleton is built with its
parameters on the meta device (skeleton.py) and tensors stream shard by shard to `device`,
each converted on the CPU and moved once; each QuantLinear is repacked for the kernel on
the CPU as soon as its last tensor has arrived, then moved.
"""
from __future__ import annotations

import gc
import logging
import traceback
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_attention
from .auto import register_auto_classes
from .huge_pages import pack_kernel_tensors
from .modeldir import ModelDir
from .placement import (CPUEmbedding, DeviceMemoryError, Int8Linear, check_dtype, head_bytes, quantize_head_4bit,
                        resolve_device, tensor_bytes)
from .saving import tied_keys
from .shards import CheckpointError, ShardReader
from .skeleton import (QUANT_SUFFIXES, assign_tensor, build_skeleton, finish_quant_linear, read_copy,
                       swap_quant_linears)

log = logging.getLogger(__name__)

LM_HEAD_BITS = (4, 8, 16)
# Buffers that old checkpoints carry but models recompute (legacy RoPE caches).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Placement:
    """Where a loaded model lives: its device and compute dtype, and the memory savers."""

    device: torch.device
    dtype: torch.dtype
    embed_on_cpu: bool = False  # the token-embedding table stays in host memory
    lm_head_bits: int = 16  # 8: int8 lm_head with per-row scales; 4: 4-bit groups (placement.quantize_head_4bit)


class LoadPlan:
    """Where each checkpoint tensor goes, and what the device must hold in the end."""

    def __init__(self, model, model_dir: ModelDir, quantized: list[str], placement: Placement):
        reader = model_dir.reader
        self.model, self.model_dir = model, model_dir
        self.dtype, self.device = placement.dtype, placement.device
        self.embed_on_cpu, self.lm_head_bits = placement.embed_on_cpu, placement.lm_head_bits
        names = {id(m): n for n, m in model.named_modules()}
        self.embed_key = names[id(model.get_input_embeddings())] + ".weight"
        head = model.get_output_embeddings()
        self.head_key = names[id(head)] + ".weight" if head is not None else None
        self.tie = bool(getattr(model.config, "tie_word_embeddings", False))
        # lm_head is built from the embedding table (tied checkpoints drop the duplicate)
        self.tied = self.tie and self.head_key not in reader
        # Quantized layers are finished as soon as their last tensor arrives.
        self.pending = {
            name: {f"{name}.{s}" for s in QUANT_SUFFIXES + ("bias",) if f"{name}.{s}" in reader} for name in quantized
        }
        self.layer_of = {key: name for name, keys in self.pending.items() for key in keys}

    def device_bytes(self, keys) -> int:
        """What the loaded model will hold on `device` (kernel repacks not included)."""
        reader = self.model_dir.reader
        fsize = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for key in keys:
            numel = 1
            for d in reader.shape(key):
                numel *= d
            size = numel * (fsize if reader.dtype(key).is_floating_point else 4)
            if key == self.embed_key:
                total += self._embedding_bytes(numel, size, reader.shape(key)[0], fsize)
            elif key == self.head_key and self.lm_head_bits < 16:
                total += head_bytes(numel, reader.shape(key)[0], fsize, self.lm_head_bits)
            else:
                total += size
        return total

    def _embedding_bytes(self, numel: int, size: int, rows: int, fsize: int) -> int:
        head = 0
        if self.tied:  # the head is made from this table: a second copy, or an int8 one
            head = head_bytes(numel, rows, fsize, self.lm_head_bits) if self.lm_head_bits < 16 else size
        separate_head = self.embed_on_cpu or self.lm_head_bits < 16
        return (0 if self.embed_on_cpu else size) + (head if separate_head else 0)

    def is_transient(self, key: str) -> bool:
        """Whether the stored tensor is dropped after reading (moved, converted, quantized, or
        regrouped for the kernel: a dynamic act-order qweight)."""
        if self.device.type != "cpu" or (key == self.head_key and self.lm_head_bits < 16):
            return True
        stored = self.model_dir.reader.dtype(key)
        if stored.is_floating_point:
            return stored != self.dtype
        layout = self.model_dir.layout
        return (stored != torch.int32 or (key.endswith(".qzeros") and layout == "gptq_v2")
                or (key.endswith(".qweight") and self.model_dir.quant.act_order == "dynamic"))

    def convert(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor -> the dtype the model keeps, on the CPU (no second device copy)."""
        if t.is_floating_point():
            return t.to(self.dtype)
        if key.endswith(("qweight", "qzeros", "g_idx")):
            return t.to(torch.int32)
        return t

    def place(self, key: str, t: torch.Tensor) -> None:
        """Put one converted CPU tensor where the plan says."""
        model = self.model
        if key in self.layer_of:
            name = self.layer_of[key]
            assign_tensor(model, key, t)
            self.pending[name].discard(key)
            if not self.pending[name]:
                self._finish_layer(name)
            return
        if key == self.embed_key and (self.embed_on_cpu or (self.tied and self.lm_head_bits < 16)):
            if self.tied:
                self._set_head(t)
            if self.embed_on_cpu:
                old = model.get_input_embeddings()
                model.set_input_embeddings(CPUEmbedding(t, getattr(old, "padding_idx", None), self.device))
                return
        if key == self.head_key and self.lm_head_bits < 16:
            self._set_head(t)
            return
        assign_tensor(model, key, t.to(self.device))

    def _finish_layer(self, name: str) -> None:
        """All of a QuantLinear's tensors are here (on the CPU): finish it, then move it whole.

        Repacking on the CPU means the device never holds the unpacked temporaries of an
        act-order repack, only the final buffers.
        """
        layer = self.model.get_submodule(name)
        finish_quant_linear(layer, f"{name}.g_idx" in self.model_dir.reader, self.model_dir.layout)
        layer.to(self.device)

    def _set_head(self, weight: torch.Tensor) -> None:
        """The output projection from `weight` (its own tensor, int8 or a device copy)."""
        head = self.model.get_output_embeddings()
        if self.lm_head_bits < 16:
            if getattr(head, "bias", None) is not None:
                raise CheckpointError(f"lm_head_bits={self.lm_head_bits} supports an lm_head without bias only")
            if self.lm_head_bits == 8:
                self.model.set_output_embeddings(Int8Linear.from_weight(weight, self.dtype, self.device))
            else:
                self.model.set_output_embeddings(quantize_head_4bit(weight, self.dtype, self.device))
        else:
            head.weight = nn.Parameter(weight.to(self.device), requires_grad=False)


def oom_message(path: str, plan: LoadPlan, needed: int, loaded: int | None, free: int, total: int) -> str:
    gib = 1024**3
    where = f" ({loaded / gib:.2f} GiB of it loaded when the allocation failed)" if loaded is not None else ""
    hints = []
    if not plan.embed_on_cpu:
        hints.append("embed_on_cpu=True (keeps the embedding table in host memory)")
    if plan.lm_head_bits == 16:
        hints.append("lm_head_bits=8 or 4 (a half or a quarter of the lm_head)")
    hints.append("freeing GPU memory held by other processes, or device='cpu'")
    return (
        f"not enough memory on {plan.device} to load {path}: the model needs about {needed / gib:.2f} GiB there"
        f"{where}; {free / gib:.2f} GiB of {total / gib:.2f} GiB are free now. Try " + ", ".join(hints)
    )


def load_quantized(
    path,
    device="cpu",
    dtype: torch.dtype | None = None,
    *,
    embed_on_cpu: bool = False,
    lm_head_bits: int = 16,
    allow_dtype_fallback: bool = False,
) -> nn.Module:
    """Load a 4-bit checkpoint directory (a path or a ModelDir) into an eval-mode model on `device`.

    dtype: the compute dtype of the non-quantized weights, scales and activations
    (default: config.json's torch_dtype, fp16 when it names none). A dtype the device
    cannot run (bf16 before Ampere) is an error, or fp16 (CUDA) / fp32 (CPU) with
    allow_dtype_fallback=True.
    embed_on_cpu: keep the token-embedding table in host memory (CPUEmbedding).
    lm_head_bits: 16 keeps lm_head in `dtype`; 8 stores it as int8 with per-row scales; 4 as 4-bit
    groups quantized at load time (round-to-nearest, placement.quantize_head_4bit). On the CPU
    both run on the quantized kernels, faster than the full-precision head at batch 1
    (perplexity cost measured in docs/ and placement.py).

    Device memory peaks near the final size. On the CPU the model attends through
    cpu_attention.ATTENTION (SDPA's path except for single-position decode steps), and the
    quantized layers' tensors lie in one arena on transparent huge pages (huge_pages.py).
    """
    model_dir = path if isinstance(path, ModelDir) else ModelDir(path)
    path = model_dir.path
    device = resolve_device(device)
    if lm_head_bits not in LM_HEAD_BITS:
        raise ValueError(f"lm_head_bits={lm_head_bits!r}: use 16 (lm_head in the compute dtype), 8 (int8 per-row) "
                         "or 4 (4-bit groups)")
    config = model_dir.require_quant()
    source = "dtype" if dtype is not None else f"{path}/config.json torch_dtype"
    dtype = check_dtype(device, dtype if dtype is not None else model_dir.dtype, allow_dtype_fallback, source)
    register_auto_classes()
    model = build_skeleton(model_dir, dtype)
    quantized = swap_quant_linears(model, model_dir, dtype)
    plan = LoadPlan(model, model_dir, quantized, Placement(device, dtype, embed_on_cpu, lm_head_bits))
    expected = set(model.state_dict())
    needed = _check_free_memory(plan, expected)
    try:
        loaded = _stream(plan, expected)
    except torch.OutOfMemoryError as e:
        allocated = torch.cuda.memory_allocated(device)
        traceback.clear_frames(e.__traceback__)  # the frames' locals hold device tensors
        del model
        plan.model = None
        gc.collect()
        torch.cuda.empty_cache()
        raise DeviceMemoryError(oom_message(path, plan, needed, allocated, *torch.cuda.mem_get_info(device))) from None
    finally:
        model_dir.close()
    _check_complete(plan, expected, loaded)
    if plan.tie and not (embed_on_cpu or lm_head_bits < 16):
        model.tie_weights()  # one table for both; the memory savers need them apart
    model.to(device)  # the small buffers built on the CPU (RoPE tables); loaded tensors stay put
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors left unloaded after reading {path}: {still_meta[:5]}")
    model.quant_config = config
    if device.type == "cpu":
        cpu_attention.use(model)  # decode steps without torch's flash-attention kernel (cpu_attention.py)
        pack_kernel_tensors(model)  # the kernels' weights on 2 MB pages: fewer TLB misses (huge_pages.py)
    return model.eval()


def estimate_host_bytes(path, dtype: torch.dtype) -> int:
    """About how many bytes `load_quantized(path, "cpu", dtype)` holds once it has run: every
    tensor at `dtype`, plus the kernel's repacks (post_init), measured on one quantized layer and
    scaled to all of them. Reads headers and one layer's tensors: for deciding whether a load
    fits before doing it."""
    model_dir = path if isinstance(path, ModelDir) else ModelDir(path)
    register_auto_classes()
    model = build_skeleton(model_dir, dtype)
    quantized = swap_quant_linears(model, model_dir, dtype)
    plan = LoadPlan(model, model_dir, quantized, Placement(torch.device("cpu"), dtype))
    reader = model_dir.reader
    expected = set(model.state_dict())
    total = plan.device_bytes(k for k in reader.keys() if k in expected)
    if quantized:
        name = quantized[0]
        stored = plan.device_bytes(plan.pending[name])
        for key in plan.pending[name]:
            assign_tensor(model, key, plan.convert(key, read_copy(reader, key)))
        layer = model.get_submodule(name)
        finish_quant_linear(layer, f"{name}.g_idx" in reader, model_dir.layout)
        repack = tensor_bytes(layer, "cpu") - stored
        all_stored = plan.device_bytes(k for n in quantized for k in plan.pending[n])
        total += round(all_stored * repack / stored) if stored else 0
    model_dir.close()
    return total


def _check_free_memory(plan: LoadPlan, expected: set[str]) -> int:
    """Bytes the model needs on a CUDA device (0 elsewhere); a sized error if they are not free."""
    if plan.device.type != "cuda":
        return 0
    needed = plan.device_bytes(k for k in plan.model_dir.reader.keys() if k in expected)
    free, total = torch.cuda.mem_get_info(plan.device)
    if needed > free:
        raise DeviceMemoryError(oom_message(plan.model_dir.path, plan, needed, None, free, total))
    return needed


def _stream(plan: LoadPlan, expected: set[str]) -> set[str]:
    reader: ShardReader = plan.model_dir.reader
    # Every tensor, quantized or not, must have the skeleton's shape: a model.norm.weight of
    # shape [1] would broadcast silently and give garbage logits.
    shapes = {k: tuple(t.shape) for k, t in plan.model.state_dict(keep_vars=True).items()}
    loaded, unexpected = set(), []
    for file, keys in reader.keys_by_file().items():
        for key in keys:
            if key.endswith(IGNORED_KEY_SUFFIXES):
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            stored = tuple(reader.shape(key))
            if key in shapes and stored != shapes[key]:
                raise CheckpointError(
                    f"tensor {key} in {reader.directory}/{file} has shape {list(stored)}, but the model its "
                    f"config.json describes expects {list(shapes[key])}; the checkpoint does not fit its config"
                )
            plan.place(key, plan.convert(key, reader.get(key, plan.is_transient(key))))
            loaded.add(key)
        reader.release(file)
    if unexpected:
        log.warning("ignored %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    return loaded


def _check_complete(plan: LoadPlan, expected: set[str], loaded: set[str]) -> None:
    path = plan.model_dir.path
    tied = tied_keys(plan.model)
    missing = sorted(k for k in expected - loaded if not (k.endswith(".g_idx") or k in tied))
    if missing:
        raise CheckpointError(f"the checkpoint at {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    unfinished = sorted(n for n, keys in plan.pending.items() if keys)
    if unfinished:
        raise CheckpointError(f"quantized layers left incomplete after reading {path}: {unfinished[:5]}")


__all__ = ["LoadPlan", "Placement", "estimate_host_bytes", "load_quantized", "oom_message"]
