"""Record the first decoder layer's inputs, and run one layer over all windows.

The model skeleton has its decoder layers on the meta device; only the modules
before them (embedding, RoPE tables...) are real. A stand-in for layer 0 records the
hidden states and keyword arguments (attention mask, position embeddings...) it is
called with and stops the forward pass there.
"""
from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict | None = None

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.hidden = hidden
        self.kwargs = kwargs
        raise StopForward


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple (older code)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, device, dtype, batch_size: int):
    """-> (hidden [n, seqlen, hidden] on CPU in `dtype`, kwargs for the layer on `device`).

    All windows share one length, so one set of keyword arguments (positions, causal
    mask) serves every batch. They are captured from a single window, so that their
    batch dimension is 1 and broadcasts over batches of any size (a smaller last one).
    """
    first = layers[0]
    recorder = _Recorder()
    layers[0] = recorder

    def run(ids):
        recorder.hidden = None
        try:
            model(input_ids=ids.to(device), use_cache=False)
        except StopForward:
            pass
        if recorder.hidden is None:
            raise RuntimeError("the model never called its first decoder layer; is the model-family spec right?")
        return recorder.hidden

    try:
        run(windows[:1])
        kwargs = {k: v for k, v in recorder.kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        hidden = None
        for start in range(0, windows.shape[0], batch_size):
            h = run(windows[start : start + batch_size])
            if hidden is None:  # preallocated: no second copy of all activations
                hidden = torch.empty(windows.shape[0], *h.shape[1:], dtype=dtype)
            hidden[start : start + h.shape[0]] = h.to("cpu", dtype)
    finally:
        layers[0] = first
    return hidden, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device, batch_size: int, out: torch.Tensor | None = None, stop=False):
    """Run `layer` over all windows in batches; write outputs into `out` if given.

    With stop=True a hook inside the layer is expected to raise StopForward (used to
    collect a Linear's inputs without running the rest of the layer).
    """
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start : start + batch_size].to(device)
        try:
            y = layer_output(layer(x, use_cache=False, **kwargs))
        except StopForward:
            if not stop:
                raise
            continue
        if out is not None:
            out[start : start + batch_size] = y.to(out.device, out.dtype)
    return out
