"""Attention for decoding on the CPU: one query position without torch's flash kernel.

torch's CPU flash-attention kernel (what SDPA picks on the CPU) has a fixed cost that dwarfs the
work of a single query position: SmolLM2's 9 heads over a 160-position cache took 75-140 us a
call (30 layers: 2-4 ms of an 18 ms compiled decode step, loaded 2-core machine), where the
arithmetic is a few microseconds. With one query position the plain formulation is two small
matrix products and a softmax, which torch.compile fuses; grouped-query heads are folded into
the matrix products instead of copying the keys and values per head (repeat_kv).

In fp32 (what the CPU runs) with the compiled extension, the single position goes to its op
`bluelm_quant::decode_attention` (quant_cuda/cpu_attention.cpp): the dot products, softmax and
weighted sum of the values in one call, skipping masked positions (a static cache's unfilled
slots), where the two matmuls cost ~20 us each in BLAS dispatch. Measured side by side, compiled
SmolLM2 decode on 2 threads, fused projections, lm_head 8-bit (`tools/bench_decode.py --variants
loop-compiled --lm-head-bits 8 --attention bluelm_cpu,bluelm_cpu_matmul [--cache-len 1024]`), the
same tokens: 72.1 -> 76.4 tok/s with a 160-position cache, 51.8 -> 73.2 with the 1024 positions
bluelm-chat --fast allocates. Other dtypes keep the matmuls.

Registered with transformers as ATTENTION ("bluelm_cpu"): one query position takes the path
below, anything else (prefill, dropout, soft-capping, position bias) transformers' SDPA path,
with SDPA's masks for both. `use(model)` switches a loaded model to it.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops  # noqa: F401  (the extension loaded and its ops' shapes registered for torch.compile)
from .extension import quant_cuda

ATTENTION = "bluelm_cpu"
# The same without the extension's op (the two matmuls for every dtype): for side-by-side runs
# (tools/bench_decode.py --attention bluelm_cpu,bluelm_cpu_matmul).
MATMUL_ATTENTION = "bluelm_cpu_matmul"
# The extension's op (quant_cuda/cpu_attention.cpp), or None: no extension, or one built before it.
_DECODE_ATTENTION = getattr(torch.ops.bluelm_quant, "decode_attention", None) if quant_cuda() is not None else None


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, **kwargs):
    """transformers' attention signature: query [b, heads, q, d], key/value [b, kv_heads, kv, d];
    returns ([b, q, heads, d], None)."""
    return _attend(module, query, key, value, attention_mask, dropout, scaling, True, **kwargs)


def matmul_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """`attention` with the two matmuls where it would take the extension's op (MATMUL_ATTENTION)."""
    return _attend(module, query, key, value, attention_mask, dropout, scaling, False, **kwargs)


def _attend(module, query, key, value, attention_mask, dropout, scaling, use_op: bool, **kwargs):
    if query.shape[2] != 1 or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, heads, _, d = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    if use_op and _kernel_applies(query, key, value, attention_mask):
        mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1).expand(b, -1)
        return _DECODE_ATTENTION(query.reshape(b, heads, d), key, value, mask, scale).reshape(b, 1, heads, d), None
    q = query.reshape(b, kv_heads, heads // kv_heads, d)  # the query heads that share a key/value head, as rows
    scores = torch.matmul(q, key.transpose(2, 3)) * scale  # [b, kv_heads, group, kv]
    if attention_mask is not None:  # SDPA's mask: bool (True = attend) or additive, [b or 1, 1, 1, kv]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv_heads, group, d]
    return out.reshape(b, 1, heads, d), None


def _kernel_applies(query, key, value, mask) -> bool:
    """Whether the extension's decode_attention op takes this call: fp32 on the CPU, a mask that is
    one row of positions per batch entry (SDPA's [b or 1, 1, 1, kv], bool or float32) or none."""
    return (
        _DECODE_ATTENTION is not None
        and query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype == torch.float32
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
                              and mask.dtype in (torch.bool, torch.float32)))
    )


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
AttentionInterface.register(MATMUL_ATTENTION, matmul_attention)
AttentionMaskInterface.register(MATMUL_ATTENTION, sdpa_mask)


def use(model) -> bool:
    """Switch `model` to ATTENTION if it runs transformers' attention interface with SDPA now;
    returns whether it did (other implementations, e.g. a model's own code, are left alone)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not getattr(model, "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(ATTENTION)
    return True


__all__ = ["ATTENTION", "MATMUL_ATTENTION", "attention", "matmul_attention", "use"]
