"""Inference only: the quantized Linears of a decoder layer that read the same input (q/k/v, and
gate/up) run as one kernel call.

Why: a batch-1 decode step calls the 4-bit kernel seven times a layer, and on the CPU each call
has a fixed cost (dispatch, the activation prologue, handing work to the thread pool) that a
576-wide SmolLM2 layer does not amortise. Measured on the 2-core machine, 1 row, g64
(tools/bench_decode.py has the end-to-end figure): q, k and v as three calls 28-41 us, as one
17-20 us; gate and up as two 41-57 us, as one 32-38 us.

How, without touching the model's code (transformers' attention calls q_proj, k_proj and
v_proj one after the other on the same hidden states): each member Linear is replaced by a
FusedMember that returns its columns of the fused layer's output. The first member called with
an input runs the fused layer and leaves the product for the others; the memo is keyed on the
input tensor itself and is dropped once every member has taken its columns, so nothing outlives
a forward, and torch.compile traces the memo as local state of the step (it is empty whenever a
step starts). A member called with another input (or, outside inference mode, the same one
changed in place) recomputes: the columns are always those of its own input.

The fused tensors are the members' tensors side by side (the standard layout concatenates along
the output dimension), so the arithmetic per output column is unchanged and the outputs equal
the unfused model's bit for bit. A fused model cannot be saved or fine-tuned: its module tree
no longer has the checkpoint's names (saving says so instead of writing a wrong checkpoint).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .huge_pages import pack_kernel_tensors
from .models import UnsupportedModelError, spec_for
from .nn import QuantLinear


class _Product(NamedTuple):
    x: torch.Tensor  # the input it was computed from
    version: int  # x's version counter then (0 where there is none)
    y: torch.Tensor  # the fused layer's output
    served: frozenset  # the members that have taken their columns


class FusedProjections:
    """One fused QuantLinear and the column ranges of its members (not a Module: the fused layer
    is registered once, under the first member, so .to() and .modules() see it once)."""

    def __init__(self, layer: QuantLinear, widths: list[int]):
        self.layer = layer
        self.bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
        self.memo: _Product | None = None

    def columns(self, x: torch.Tensor, index: int) -> torch.Tensor:
        # Version counters: not under dynamo (the step owns x), not on inference-mode tensors.
        version = 0 if torch.compiler.is_compiling() or x.is_inference() else x._version
        memo = self.memo
        if memo is None or memo.x is not x or memo.version != version or index in memo.served:
            memo = _Product(x, version, self.layer(x), frozenset())
        memo = memo._replace(served=memo.served | {index})
        self.memo = None if len(memo.served) == len(self.bounds) else memo
        start, stop = self.bounds[index]
        return memo.y[..., start:stop]


class FusedMember(nn.Module):
    """Stands in for one member Linear: its columns of the fused product."""

    def __init__(self, group: FusedProjections, index: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.index = in_features, out_features, index
        if index == 0:
            self.fused = group.layer
        self.group = group  # a plain object, not a Module: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.columns(x, self.index)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix.rstrip('.')} is fused with its neighbours for inference (bluelm_quant.fuse): the model "
            "cannot be saved or fine-tuned; load the checkpoint again without fuse_projections"
        )

    def extra_repr(self) -> str:
        start, stop = self.group.bounds[self.index]
        return f"in_features={self.in_features}, out_features={self.out_features}, columns [{start}, {stop}) of the fused layer"


def _layout(m: QuantLinear) -> tuple:
    return (m.in_features, m.bits, m.group_size, m.kernel_group_size, m.scales.dtype, m.qweight.device, m.bias is None)


def _fusable(layers: list[nn.Module]) -> bool:
    """Whether the layers can be concatenated along the output: QuantLinears in the kernel layout
    with the same input, grid, g_idx (so the same act-order permutation: ops.prepare derives it
    from g_idx alone), dtypes and device."""
    first = layers[0]
    if not all(isinstance(m, QuantLinear) and m.kernel_group_size is not None for m in layers):
        return False
    return all(_layout(m) == _layout(first) and torch.equal(m.g_idx, first.g_idx) for m in layers)


@torch.no_grad()
def fuse_layers(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing the layers' outputs side by side (inputs must pass _fusable)."""
    first = layers[0]
    widths = [m.out_features for m in layers]
    fused = QuantLinear(first.in_features, sum(widths), first.bits, first.group_size, bias=first.bias is not None,
                        dtype=first.scales.dtype, device="meta")
    # already in the kernel's row order; plain columns (a member may hold column blocks: column_blocks.py)
    fused.qweight = torch.cat([m.quant_layer().column_qweight() for m in layers], dim=1)
    fused.qzeros = torch.cat([m.qzeros for m in layers], dim=1)
    fused.scales = torch.cat([m.scales for m in layers], dim=1)
    fused.g_idx = first.g_idx
    fused.bias = torch.cat([m.bias for m in layers]) if first.bias is not None else None
    fused.kernel_perm, fused.kernel_group_size = first.kernel_perm, first.kernel_group_size
    return fused.train(first.training)


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, every group of a decoder layer's quantized Linears that read the same input
    (the model spec's `sequential` groups: q/k/v and gate/up for LLaMA-like models). Returns the
    number of groups fused; a group whose members differ (grid, act-order permutation, dtype) is
    left as it is, and so is a model of a family with no spec. On the CPU the quantized layers'
    tensors are then packed into a new huge-page arena (huge_pages.pack_kernel_tensors); the old
    one is freed once the last tensor has moved, so host memory briefly holds both.

    Inference only (see the module docstring): the fused model cannot be saved, and LoRA refuses
    it (bluelm_quant.lora). One limit of the memo: under torch.inference_mode tensors carry no
    version counter, so code that changed a projection's input in place between the q_proj and
    k_proj calls would get k's columns of the input as it was (transformers' attention never does).
    """
    if hasattr(model, "get_base_model"):  # a PeftModel: its LoRA layers wrap the separate Linears
        raise ValueError("fuse_projections: this is a PEFT model, whose LoRA layers need the separate q/k/v and "
                         "gate/up Linears; fuse the base model without an adapter, or merge the adapter first "
                         "(tools/merge_adapter.py)")
    try:
        spec = spec_for(model.config)
    except UnsupportedModelError:
        return 0
    layers = model.get_submodule(spec.layers)
    fused = 0
    for layer in layers:
        for names in spec.sequential:
            if len(names) < 2:
                continue
            members = [layer.get_submodule(n) for n in names]
            if not _fusable(members):
                continue
            group = FusedProjections(fuse_layers(members), [m.out_features for m in members])
            for i, (name, m) in enumerate(zip(names, members)):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child,
                        FusedMember(group, i, m.in_features, m.out_features))
            fused += 1
    if fused:  # the fused tensors are new allocations: all kernel tensors into one huge-page arena again
        pack_kernel_tensors(model)
    return fused


__all__ = ["FusedMember", "FusedProjections", "fuse_layers", "fuse_projections"]
