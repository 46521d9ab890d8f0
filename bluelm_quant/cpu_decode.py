"""Inference only, CPU: a decoder layer's decode step (one position) as two extension calls.

Why: at batch 1 a small model's decode step is mostly the work between its kernel calls. In
SmolLM2's compiled step (fused projections, 2 threads) the small ops inductor generates for each
of the 30 layers (two RMSNorms, RoPE, the SiLU gate, residual adds, the views and splits between
them) took ~4 ms of ~13, against ~5.5 ms in the 4-bit kernels. `enable_decode_layers` makes each
layer's single-position forward:

    q, k, v = decode_qkv(x)                  RMSNorm, the fused q/k/v projection, RoPE  (one op)
    keys, values = cache.update(k, v)         the model's own cache object (any Cache class)
    a = attention(q, keys, values, mask)      the model's own attention function and mask
    x = decode_o_mlp(x, a)                    o, residual, RMSNorm, gate/up, SiLU, down, residual  (one op)

(quant_cuda/cpu_decode_layer.cpp). The cache and attention stay transformers' own, so any cache
class, mask and attention implementation keeps working, and `model.generate` and our Generator
loop (compiled or not) take the same path. Everything else runs the layer's own forward: prefill,
training or gradients enabled, autocast, other dtypes and devices, a layer whose kernel plans are
not made yet, and a layer whose modules were replaced or carry forward hooks since (the ops would
skip them: user hooks, accelerate's, transformers' capture of output_attentions).

What qualifies: LLaMA and BlueLM decoder layers (the same arithmetic: RMSNorm in fp32,
rotate-half RoPE, SiLU-gated MLP) whose q/k/v and gate/up are fused (fuse.fuse_projections: the
ops take the fused layers) and whose o and down are 4-bit QuantLinears; fp32 activations on the
CPU. The layer's Linears run through their GemmPlan (ops.plan_gemm: the kernel call decided once,
after the self-check), so a configuration the self-check refused never reaches these ops.
The arithmetic is transformers' in another summation order: logits agree to rounding, not bit
for bit (tests/test_cpu_decode.py).
"""
from __future__ import annotations

import types
from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from . import huge_pages, ops
from .column_blocks import use_column_blocks
from .extension import quant_cuda
from .fuse import FusedMember, fuse_projections
from .models import UnsupportedModelError, spec_for
from .models.bluelm import modeling_bluelm
from .nn import QuantLinear

try:  # transformers >= 5 names its SiLU; older releases use torch's
    from transformers.activations import SiLUActivation
except ImportError:  # pragma: no cover - depends on the installed transformers
    SiLUActivation = nn.SiLU

# The decoder layers whose forward the two ops reproduce, with their attention and norm classes.
_LAYERS = (modeling_llama.LlamaDecoderLayer, modeling_bluelm.BlueLMDecoderLayer)
_ATTENTIONS = (modeling_llama.LlamaAttention,)  # BlueLMAttention is LlamaAttention
_NORMS = (modeling_llama.LlamaRMSNorm, modeling_bluelm.BlueLMRMSNorm)


def ops_available() -> bool:
    """Whether the compiled extension has the decode-layer ops (an older build lacks them)."""
    return quant_cuda() is not None and hasattr(torch.ops.bluelm_quant, "decode_qkv")


class LayerParts(NamedTuple):
    """What a decode step reads from one decoder layer (its own modules, not copies)."""

    qkv: QuantLinear  # the fused q/k/v layer
    o: QuantLinear
    gate_up: QuantLinear  # the fused gate/up layer
    down: QuantLinear
    input_norm: nn.Module
    post_attention_norm: nn.Module
    heads: int
    kv_heads: int
    # (parent's _modules dict, name, module) of every module the ops stand in for: replaced or
    # hooked since, the layer runs its own forward (_untouched; the dicts, not getattr, because
    # nn.Module's __getattr__ made that check ~25 us a layer)
    bound: tuple
    bypassed: tuple  # those modules and the fused layers behind the members


def _untouched(parts: LayerParts) -> bool:
    """The layer still holds the modules its parts were taken from, and no forward hook watches any of
    them (user hooks, accelerate's, transformers' output_attentions capture): the ops would skip
    those hooks, so the layer's own forward runs instead."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for modules, name, module in parts.bound:
        if modules.get(name) is not module:
            return False
    for m in parts.bypassed:
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


def _fused_group(members: list[nn.Module]) -> QuantLinear | None:
    """The fused QuantLinear behind `members` when they are exactly its members, in order."""
    if not all(isinstance(m, FusedMember) for m in members):
        return None
    group = members[0].group
    if any(m.group is not group for m in members) or [m.index for m in members] != list(range(len(members))):
        return None
    return group.layer if len(group.bounds) == len(members) else None


def layer_parts(layer: nn.Module, config) -> LayerParts | None:
    """The layer's parts when the ops can run its decode step, else None (it keeps its forward)."""
    if type(layer) not in _LAYERS or not isinstance(getattr(layer, "self_attn", None), _ATTENTIONS):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(getattr(mlp, "act_fn", None), (SiLUActivation, nn.SiLU)):
        return None
    if not all(isinstance(n, _NORMS) for n in (layer.input_layernorm, layer.post_attention_layernorm)):
        return None
    qkv = _fused_group([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up = _fused_group([mlp.gate_proj, mlp.up_proj])
    linears = (qkv, attn.o_proj, gate_up, mlp.down_proj)
    if not all(isinstance(m, QuantLinear) and m.bits == 4 for m in linears):
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if qkv.out_features != (heads + 2 * kv_heads) * attn.head_dim:
        return None
    slots = [(layer, "self_attn"), (layer, "mlp"), (layer, "input_layernorm"), (layer, "post_attention_layernorm"),
             (attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
             (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    bound = tuple((parent._modules, name, getattr(parent, name)) for parent, name in slots)
    return LayerParts(qkv, attn.o_proj, gate_up, mlp.down_proj, layer.input_layernorm, layer.post_attention_layernorm,
                      heads, kv_heads, bound, tuple(m for _, _, m in bound) + (qkv, gate_up))


def enable_decode_layers(model: nn.Module) -> int:
    """Route the single-position forward of every qualifying decoder layer through the ops (see the
    module docstring); returns how many layers qualify. Call after fuse.fuse_projections. Nothing
    happens without the extension's ops, or for a family with no spec."""
    if not ops_available():
        return 0
    try:
        spec = spec_for(model.config)
    except UnsupportedModelError:
        return 0
    enabled = 0
    for layer in model.get_submodule(spec.layers):
        if "forward" in layer.__dict__ and "_decode_parts" not in layer.__dict__:
            continue  # another wrapper's forward (accelerate's hooks put one there): left alone
        parts = layer_parts(layer, model.config)
        if parts is None:
            continue
        # Plain attributes on the instance: the module tree, its names and its state_dict stay as they are.
        layer.__dict__["_decode_parts"] = parts
        layer.__dict__["forward"] = types.MethodType(_decode_forward, layer)
        enabled += 1
    return enabled


def prepare_cpu_decode(model: nn.Module) -> tuple[int, int, int]:
    """How the chat and the decode benchmarks run a 4-bit model on the CPU: the projections that share
    an input fused (fuse.fuse_projections), the wide layers' weights in column blocks
    (column_blocks.use_column_blocks), then the decode-layer ops (enable_decode_layers).
    Returns (groups fused, layers in column blocks, layers enabled). Inference only: the model can
    no longer be saved."""
    fused = fuse_projections(model)  # packs the kernels' tensors into a new arena when it fused
    # The column blocks are written in place once the model alone holds its kernel tensors, as a
    # packing leaves them (fusing did one, else it is done here): then the weights are never held
    # three times (the loader's arena, blocked copies, a new arena). Packing disabled: new tensors.
    fresh = huge_pages.packing_enabled() and (fused > 0 or huge_pages.pack_kernel_tensors(model) > 0)
    blocked = use_column_blocks(model, in_place=fresh)
    return fused, blocked, enable_decode_layers(model)


def decode_layers_enabled(model: nn.Module) -> int:
    """How many of the model's layers run their decode step through the ops."""
    return sum("_decode_parts" in m.__dict__ for m in model.modules())


def disable_decode_layers(model: nn.Module) -> None:
    """Undo enable_decode_layers: every layer runs its own forward again."""
    for module in model.modules():
        if "_decode_parts" in module.__dict__:
            del module.__dict__["_decode_parts"]
            if getattr(module.__dict__.get("forward"), "__func__", None) is _decode_forward:
                del module.__dict__["forward"]


def _kernel_args(plan: ops.GemmPlan) -> list:
    return [plan.qweight, plan.qzeros, plan.scales, plan.perm, plan.bias]


def _plans(parts: LayerParts, x: torch.Tensor) -> tuple | None:
    """The four Linears' GemmPlans when each applies to this step's activations (fp32, CPU), else
    None: the layer's own forward runs and makes them (the first call's self-check)."""
    rows = x.shape[0]
    plans = tuple(m._plan for m in (parts.qkv, parts.o, parts.gate_up, parts.down))
    if all(isinstance(p, ops.GemmPlan) and ops.plan_ready(p, x.device, x.dtype, rows) for p in plans):
        return plans
    return None


def _decode_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    parts: LayerParts = self._decode_parts
    plans = None
    # The ops have no backward and compute in fp32 outside autocast: otherwise the layer's own forward.
    if (hidden_states.dim() == 3 and hidden_states.shape[1] == 1 and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32 and not self.training and not self.self_attn.training
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and past_key_values is not None and position_embeddings is not None
            and parts.input_norm.weight.dtype == parts.post_attention_norm.weight.dtype == torch.float32
            and _untouched(parts)):
        plans = _plans(parts, hidden_states)
    if plans is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    qkv, o, gate_up, down = plans
    attn = self.self_attn
    batch = hidden_states.shape[0]
    x = hidden_states.view(batch, -1)
    cos, sin = position_embeddings
    q, k, v = torch.ops.bluelm_quant.decode_qkv(x, parts.input_norm.weight, parts.input_norm.variance_epsilon,
                                                _kernel_args(qkv), qkv.group_size, cos, sin, parts.heads,
                                                parts.kv_heads)
    keys, values = past_key_values.update(k.unsqueeze(2), v.unsqueeze(2), attn.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                      modeling_llama.eager_attention_forward)
    out, _ = attention(attn, q.unsqueeze(2), keys, values, attention_mask, dropout=0.0, scaling=attn.scaling,
                       position_ids=position_ids, use_cache=use_cache, **kwargs)
    y = torch.ops.bluelm_quant.decode_o_mlp(
        x, out.reshape(batch, -1), _kernel_args(o), o.group_size, parts.post_attention_norm.weight,
        parts.post_attention_norm.variance_epsilon, _kernel_args(gate_up), gate_up.group_size, _kernel_args(down),
        down.group_size)
    return y.view(batch, 1, -1)


__all__ = ["LayerParts", "decode_layers_enabled", "disable_decode_layers", "enable_decode_layers", "layer_parts",
           "ops_available", "prepare_cpu_decode"]
