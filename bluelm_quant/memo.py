"""Skip re-running a module whose output is its last Linear applied to a remembered input.

True-sequential GPTQ runs a decoder layer once per Linear group and once more for the
layer's output. Once the q/k/v group is quantized, attention (projections, RoPE, SDPA)
hands o_proj the same input in every later pass; once gate/up are quantized, the MLP
hands down_proj the same input. A TailMemo records that input in the pass that
collects the tail Linear's Hessian, and from then on the module's forward becomes
tail(recorded input): later passes cost one Linear instead of the whole module
(SmolLM2 on CPU: attention runs once per layer instead of four times).

Which modules qualify is model-family data (`ModelSpec.tails`); the first shortcut call
in each layer also runs the real module and checks that the two agree, so a wrong
spec is an error rather than a silently different model.
"""
from __future__ import annotations

import torch
from torch import nn

from .models import UnsupportedModelError


class TailMemo:
    def __init__(self, module: nn.Module, tail: nn.Linear, rows: int, name: str):
        self.module, self.tail, self.rows, self.name = module, tail, rows, name
        self.inputs: torch.Tensor | None = None  # [rows, ..., in_features] on the CPU
        self._offset = 0  # passes visit the rows in order, batch by batch
        self._extras: int | None = None  # how many outputs follow the tail's; None until checked

    def _take(self, batch: int) -> slice:
        rows = slice(self._offset, self._offset + batch)
        self._offset = (self._offset + batch) % self.rows
        return rows

    def record(self, x: torch.Tensor) -> None:
        """Store one batch of the tail's input (called from its forward pre-hook)."""
        if self.inputs is None:
            self.inputs = torch.empty(self.rows, *x.shape[1:], dtype=x.dtype)
        self.inputs[self._take(x.shape[0])] = x.detach().to("cpu")

    def install(self) -> None:
        """From now on the module returns tail(recorded input) for each batch."""
        if self.inputs is None or self._offset:
            raise RuntimeError(f"{self.name}: install() before a whole pass was recorded")
        original = self.module.forward

        def forward(*args, **kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if x is None:
                raise RuntimeError(f"{self.name}: cannot tell the batch size of this call")
            y = self.tail(self.inputs[self._take(x.shape[0])].to(x.device))
            if self._extras is None:
                real = original(*args, **kwargs)
                self._check(real[0] if isinstance(real, tuple) else real, y)
                self._extras = len(real) - 1 if isinstance(real, tuple) else -1
                return real
            # Extra outputs (attention weights) are dropped by the layer; None stands in.
            return y if self._extras < 0 else (y,) + (None,) * self._extras

        self.module.forward = forward

    def _check(self, real: torch.Tensor, memo: torch.Tensor) -> None:
        scale = float(real.abs().max()) or 1.0
        if real.shape != memo.shape or float((real - memo).abs().max()) > 1e-3 * scale:
            raise UnsupportedModelError(
                f"{self.name}'s output is not its tail Linear applied to that Linear's input, as the model-family "
                "spec's `tails` claims; remove the entry from its ModelSpec in bluelm_quant/models/__init__.py"
            )

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
        self.inputs = None
