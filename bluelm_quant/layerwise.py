"""Perplexity of a model directory with one decoder layer in memory at a time.

What `evaluate.perplexity` measures (same windows, same NLL), computed the way the
quantization pipeline runs a model: the skeleton on the meta device, the first decoder
layer's inputs captured for all windows (capture.py), then each layer materialized from the
checkpoint, run over every window and dropped, and last the final norm and lm_head one
window at a time. Memory stays near one decoder layer plus the activations, whatever the
depth: bluelm-quantize compares the full-precision and the 4-bit model this way after a
run, within the memory the quantization itself needed (loading a 7B model whole in fp32
takes ~28 GB).

Works for a full-precision directory and a 4-bit one (QuantLinear layers are filled from
the packed tensors and repacked for the kernel, as load_quantized does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .auto import register_auto_classes
from .capture import capture_first_layer_inputs, run_layer
from .evaluate import text_windows
from .loading import IGNORED_KEY_SUFFIXES
from .modeldir import ModelDir
from .models import spec_for
from .nn import QuantLinear
from .placement import resolve_device
from .shards import CheckpointError
from .skeleton import assign_tensor, build_skeleton, finish_quant_linear, materialize, read_copy, swap_quant_linears

TOKENS_PER_BATCH = 4096  # windows per layer forward = this / seqlen, as in the pipeline


@torch.no_grad()
def layerwise_perplexity(path, tokenizer, texts: dict[str, str], seqlen: int = 512, max_windows: int | None = None,
                         device="cpu", dtype: torch.dtype = torch.float32, progress: bool = True) -> dict[str, float]:
    """{name: perplexity} of the model in `path` (a directory or a ModelDir, full precision or
    4-bit) on each text of `texts`, as `evaluate.perplexity(model, tokenizer, text, seqlen,
    max_windows)` would give it, without ever holding more than one decoder layer."""
    model_dir = path if isinstance(path, ModelDir) else ModelDir(path)
    device = resolve_device(device)
    spec = spec_for(model_dir)
    register_auto_classes()
    model = build_skeleton(model_dir, dtype)
    quantized = set(swap_quant_linears(model, model_dir, dtype)) if model_dir.is_quantized else set()
    per_text = {name: text_windows(tokenizer, text, seqlen, max_windows) for name, text in texts.items()}
    windows = torch.cat(list(per_text.values()))
    batch = max(1, TOKENS_PER_BATCH // seqlen)
    try:
        for name in _present(model, spec.before):
            materialize(model.get_submodule(name), name, model_dir.reader, device, dtype)
        layers = model.get_submodule(spec.layers)
        hidden, kwargs = capture_first_layer_inputs(model, layers, windows, device, dtype, batch)
        for name in _present(model, spec.before):
            model.get_submodule(name).to("meta")
        for i in tqdm(range(len(layers)), desc="perplexity", unit="layer", disable=not progress):
            prefix = spec.layer_name(i)
            _fill_layer(model, layers[i], prefix, model_dir, quantized, device, dtype)
            run_layer(layers[i], hidden, kwargs, device, batch, out=hidden)
            layers[i].to("meta")
        nll = _head_nll(model, spec.after, model_dir, hidden, windows, device, dtype)
    finally:
        model_dir.close()
    result, start = {}, 0
    for name, w in per_text.items():
        result[name] = math.exp(sum(nll[start:start + w.shape[0]]) / (w.shape[0] * (seqlen - 1)))
        start += w.shape[0]
    return result


def _present(model: nn.Module, names) -> list[str]:
    found = []
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        found.append(name)
    return found


def _fill_layer(model: nn.Module, layer: nn.Module, prefix: str, model_dir: ModelDir, quantized: set[str],
                device, dtype) -> None:
    """Give a skeleton decoder layer its tensors from the checkpoint, on `device`."""
    own = [n for n in quantized if n.startswith(prefix + ".")]
    if not own:
        materialize(layer, prefix, model_dir.reader, device, dtype)
        return
    reader = model_dir.reader
    shapes = {f"{prefix}.{n}": t.shape for n, t in layer.state_dict(keep_vars=True).items()}
    for key in [k for k in reader.keys() if k.startswith(prefix + ".") and not k.endswith(IGNORED_KEY_SUFFIXES)]:
        if key not in shapes:
            continue  # a tensor the model does not use (load_quantized warns about these)
        if tuple(reader.shape(key)) != tuple(shapes[key]):
            raise CheckpointError(f"tensor {key} has shape {list(reader.shape(key))}, the model expects "
                                  f"{list(shapes[key])}")
        t = read_copy(reader, key, "cpu", dtype)
        if key.endswith((".qweight", ".qzeros", ".g_idx")):
            t = t.to(torch.int32)
        assign_tensor(model, key, t)
    for name in own:
        finish_quant_linear(model.get_submodule(name), f"{name}.g_idx" in reader, model_dir.layout)
    layer.to(device)
    left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{model_dir.path} lacks tensors of {prefix}: {left[:5]}")


def _head_nll(model: nn.Module, after: tuple[str, ...], model_dir: ModelDir, hidden: torch.Tensor,
              windows: torch.Tensor, device, dtype) -> list[float]:
    """Per window: the summed NLL of tokens 1.. given the final hidden states (one window at a
    time: a window's fp32 logits are seqlen x vocab, 200 MB at BlueLM's vocabulary)."""
    aliases = _tied_aliases(model)
    modules = [model.get_submodule(name) for name in after]
    for name, module in zip(after, modules):
        materialize(module, name, model_dir.reader, device, dtype, aliases=aliases)
    nll = []
    for i in range(hidden.shape[0]):
        h = hidden[i:i + 1].to(device)
        for module in modules:
            h = module(h)
        ids = windows[i:i + 1].to(device)
        nll.append(F.cross_entropy(h[0, :-1].float(), ids[0, 1:], reduction="sum").item())
    for module in modules:
        module.to("meta")
    return nll


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{lm_head.weight: model.embed_tokens.weight} when the config ties them (checkpoints omit the head)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


__all__ = ["layerwise_perplexity"]
