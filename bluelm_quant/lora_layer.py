"""PEFT's LoRA layer for our QuantLinear (imports peft: load it through bluelm_quant.lora).

PEFT builds one of these for every targeted QuantLinear once the LoraConfig carries our
mapping (`LoraConfig._register_custom_module`, PEFT's extension point for layer types it
does not know; bluelm_quant.lora does the registering). It follows PEFT's conventions for
LoRA layers, so PEFT's own code saves, loads, enables, disables and deletes adapters:
the trainable tensors live in the `lora_A` / `lora_B` ModuleDicts keyed by adapter name,
and the 4-bit layer stays `base_layer` (its state-dict keys move under `base_layer.`, which
PEFT strips again when it saves the base model).

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling

The adapters are kept in float32 whatever the model's dtype (the QuantLinear's int32
qweight gives PEFT no float dtype to follow), as QLoRA trains them. A 4-bit layer cannot
absorb an adapter, so merge() refuses: bluelm_quant.merge writes a merged model in full
precision instead (tools/merge_adapter.py).
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .nn import QuantLinear


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters beside a frozen QuantLinear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if not isinstance(module, QuantLinear):
            raise TypeError(f"QuantLoraLinear wraps a QuantLinear, got {type(module).__name__}")
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        # DoRA and its kin rescale the full weight: they need it in full precision.
        if getattr(config, "use_dora", False):
            raise ValueError("use_dora=True needs the full-precision weight; LoRA on a 4-bit QuantLinear supports plain LoRA only")
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("per-sample adapter_names are not supported on 4-bit layers; activate one adapter with set_adapter")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight update [out_features, in_features] in float32: scaling * B @ A."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "a 4-bit QuantLinear cannot absorb a LoRA adapter; write a merged full-precision model with "
            "bluelm_quant.merge.merge_adapter (tools/merge_adapter.py, --requantize for a 4-bit one)"
        )

    def unmerge(self) -> None:  # nothing is ever merged
        return None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


__all__ = ["QuantLoraLinear"]
