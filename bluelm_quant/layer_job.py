"""One decoder layer's share of a quantization run, as steps that return their results.

    job = LayerJob(run, index, layer)
    result = job.quantize(hidden)        # per Linear group, forward order: collect -> solve
    job.propagate(hidden)                # the quantized layer's outputs feed the next layer

On resume, `job.restore(result)` writes a saved result back instead of quantizing.

collect: one pass over the calibration windows that accumulates the Hessian of the group's
  input (the pass stops right there in true-sequential mode);
solve: GPTQ on the Linears that share that Hessian, as one stacked matrix, then write each
  Linear's dequantized weight back so later groups and layers see the quantized model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .capture import StopForward, run_layer
from .config import QuantConfig
from .gptq import GPTQ, GPTQError
from .hardware import torch_threads
from .memo import TailMemo
from .models import ModelSpec
from .packing import gptq_tensors

# Measured on a 2-core EPYC: solving a 576-input layer takes 0.14 s on 1 thread and 0.75 s
# on 2; at 1536 inputs 2 threads win slightly when the machine is idle (0.29 s vs 0.41 s)
# but lose 4-15x as soon as another process holds a core. One thread up to this K; 7B
# layers (K = 4096, 11008) are dominated by large matmuls and factorizations that need
# both cores.
SOLVER_ONE_THREAD_MAX_K = 2048
# Recorded tail inputs (memo.py) per layer: SmolLM2 with 128 x 512 windows needs 0.3 GB;
# a 7B with 128 x 2048 would need 7.9 GB, so there only what fits is memoized.
MEMO_MAX_BYTES = 2 << 30
# What a quantized Linear's result holds, in file order (bias only when the Linear has one).
RESULT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


class NonFiniteActivationError(RuntimeError):
    """A layer produced NaN or Inf."""


@dataclass
class LayerRun:
    """What every layer of one quantization run shares."""

    spec: ModelSpec
    config: QuantConfig
    device: torch.device
    batch: int  # calibration windows per forward batch
    layer_kwargs: dict  # the decoder layer's keyword arguments (positions, causal mask)
    source_weight: object  # (layer index, Linear name) -> the weight as the checkpoint stores it


@dataclass
class LayerResult:
    """Packed tensors and GPTQ statistics of a layer's Linears, by Linear name (spec names)."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> suffix -> tensor
    stats: dict[str, dict] = field(default_factory=dict)  # name -> {"loss", "damp", "seconds"}

    def merge(self, other: "LayerResult") -> "LayerResult":
        return LayerResult({**self.tensors, **other.tensors}, {**self.stats, **other.stats})

    def flat(self) -> dict[str, torch.Tensor]:
        """{"self_attn.q_proj.qweight": ...}: the keys of a layer file and, under the layer's
        name, of the checkpoint."""
        return {f"{name}.{suffix}": t for name, ts in self.tensors.items() for suffix, t in ts.items()}

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], linears: tuple[str, ...], stats: dict) -> "LayerResult":
        tensors = {name: {s: flat[f"{name}.{s}"] for s in RESULT_SUFFIXES if f"{name}.{s}" in flat} for name in linears}
        return cls(tensors, stats)


class LayerJob:
    def __init__(self, run: LayerRun, index: int, layer: nn.Module):
        self.run, self.index, self.layer = run, index, layer
        self.name = run.spec.layer_name(index)

    # --- steps -------------------------------------------------------------------------

    def quantize(self, hidden: torch.Tensor) -> LayerResult:
        """GPTQ every Linear of the layer, group by group in forward order."""
        run = self.run
        sequential = run.config.true_sequential
        groups = run.spec.sequential if sequential else (run.spec.linears,)
        # A recorded tail input is replayable only if every Linear before the tail was final
        # when it was recorded: true-sequential guarantees it, one pass for all groups does not.
        memos = self._tail_memos(hidden) if sequential else {}
        result = LayerResult()
        try:
            for group in groups:
                result = result.merge(self._quantize_group(group, hidden, memos))
        finally:
            for memo in memos.values():
                memo.remove()
        return result

    def restore(self, result: LayerResult) -> None:
        """Write a saved result's weights back (resume): the layer then computes exactly what it
        computed right after quantizing."""
        for name in self.run.spec.linears:
            write_back(self.layer.get_submodule(name), result.tensors[name], self.run.config.bits)

    def propagate(self, hidden: torch.Tensor) -> torch.Tensor:
        """Replace `hidden` by this layer's outputs (in place: one activation buffer per run)."""
        return run_layer(self.layer, hidden, self.run.layer_kwargs, self.run.device, self.run.batch, out=hidden)

    # --- one Linear group ------------------------------------------------------------------

    def _quantize_group(self, group: tuple[str, ...], hidden: torch.Tensor, memos: dict[str, TailMemo]) -> LayerResult:
        """One pass over the windows for the group's Hessians, then GPTQ each sub-group."""
        spec = self.run.spec
        # Spec groups whose Linears are in `group` (several when not true-sequential).
        subgroups = [g for g in spec.sequential if g[0] in group]
        solvers = self._collect(subgroups, hidden, memos)
        result = LayerResult()
        for sub in subgroups:
            result = result.merge(self._solve(sub, solvers[sub[0]]))
            solvers[sub[0]].free()
            for memo in (memos[n] for n in sub if n in memos):
                memo.install()  # its tail is final now: later passes replay it
        return result

    def _collect(self, subgroups, hidden: torch.Tensor, memos: dict[str, TailMemo]) -> dict[str, GPTQ]:
        """Hessians of each sub-group's input (its Linears read the same input: one serves all)."""
        run, layer = self.run, self.layer
        solvers = {g[0]: GPTQ(layer.get_submodule(g[0]).in_features, device=run.device) for g in subgroups}
        recording = {g[0]: [memos[n] for n in g if n in memos] for g in subgroups}

        def hook_for(first: str):
            def collect(_module, inputs):
                try:
                    solvers[first].add_batch(inputs[0])
                except GPTQError as e:  # e.g. NaN/Inf activations: say which layer
                    raise NonFiniteActivationError(f"{self.name}.{first}: {e}") from None
                for memo in recording[first]:
                    memo.record(inputs[0])
                if run.config.true_sequential:
                    raise StopForward  # the rest of the layer is not needed for this group

            return collect

        hooks = [layer.get_submodule(first).register_forward_pre_hook(hook_for(first)) for first in solvers]
        try:
            run_layer(layer, hidden, run.layer_kwargs, run.device, run.batch, stop=run.config.true_sequential)
        finally:
            for h in hooks:
                h.remove()
        return solvers

    def _solve(self, names: tuple[str, ...], solver: GPTQ) -> LayerResult:
        """GPTQ the Linears that share one Hessian as one stacked weight, then split.

        GPTQ treats output rows independently given H, so stacking q/k/v (or gate/up) is
        exact and runs the column loop once instead of once per Linear.
        """
        config = self.run.config
        linears = [self.layer.get_submodule(n) for n in names]
        # The weights as the checkpoint stores them (fp32 for SmolLM2), not the forward copy
        # (bf16 on a CPU with native bf16 would round them first).
        weight = torch.cat([self.run.source_weight(self.index, n) for n in names])
        # Small factorizations and the column loop are latency-bound: a second thread only
        # adds synchronization (and stalls badly when another process holds the other core).
        threads = 1 if weight.device.type == "cpu" and weight.shape[1] <= SOLVER_ONE_THREAD_MAX_K else None
        with torch_threads(threads):
            try:
                solved = solver.quantize(weight, config, keep_hessian=False)  # used once
            except GPTQError as e:
                raise GPTQError(f"{self.name}.{'/'.join(names)}: {e}") from None
        result, start = LayerResult(), 0
        for name, linear in zip(names, linears):
            stop = start + linear.out_features
            tensors = gptq_tensors(solved.quantized.rows(start, stop))
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().to("cpu", torch.float16)
            write_back(linear, tensors, config.bits)
            result.tensors[name] = {k: v.cpu() for k, v in tensors.items()}
            result.stats[name] = {
                "loss": float(solved.row_loss[start:stop].sum()),
                "damp": float(solved.damp),
                "seconds": float(solved.seconds) * (stop - start) / weight.shape[0],
            }
            start = stop
        return result

    def _tail_memos(self, hidden: torch.Tensor) -> dict[str, TailMemo]:
        """TailMemos by tail Linear name, in forward order, while they fit MEMO_MAX_BYTES."""
        memos, total = {}, 0
        for module, tail in self.run.spec.tails:
            linear = self.layer.get_submodule(tail)
            size = hidden.shape[0] * hidden.shape[1] * linear.in_features * hidden.element_size()
            if total + size > MEMO_MAX_BYTES:
                break
            memos[tail] = TailMemo(self.layer.get_submodule(module), linear, hidden.shape[0], f"{self.name}.{module}")
            total += size
        return memos


def write_back(linear: nn.Linear, tensors: dict[str, torch.Tensor], bits: int) -> None:
    """Replace a Linear's weight by its dequantized value (what later layers must see).

    Used both after GPTQ and on resume, so that both paths feed the next layer
    bit-identical weights.
    """
    device = linear.weight.device
    w = ops.dequantize_reference(
        *(tensors[name].to(device) for name in ("qweight", "qzeros", "scales", "g_idx")), bits, torch.float32
    )
    linear.weight.data.copy_(w.T.to(linear.weight.dtype))


__all__ = ["LayerJob", "LayerResult", "LayerRun", "NonFiniteActivationError", "write_back"]
