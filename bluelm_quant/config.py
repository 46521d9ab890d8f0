"""QuantConfig: the one description of how a model is quantized.

It round-trips through `quantize_config.json` and through the `quantization_config`
block of `config.json` in the form transformers / optimum / vLLM read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 zeros (stored zero - 1) / true zeros


class QuantConfigError(ValueError):
    """A quantization setting is invalid or disagrees with the tensors."""


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output channel (per-channel)
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with desc_act: groups fixed before reordering
    true_sequential: bool = True
    damp_percent: float = 0.01
    mse_clip: bool = False  # search a clipped range that minimises the grid's MSE
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    extra: dict = field(default_factory=dict)  # unknown keys kept for the round trip

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(
                f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}"
            )
        gs = self.group_size
        if not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % 8 == 0)):
            raise QuantConfigError(
                f"group_size={gs!r} must be -1 (per-channel) or a positive multiple of 8"
            )
        if not 0.0 < self.damp_percent < 1.0:
            raise QuantConfigError(
                f"damp_percent={self.damp_percent} must be in (0, 1); 0.01 is the usual value"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise QuantConfigError(
                f"checkpoint_format={self.checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of quantization groups along in_features (the last may be partial)."""
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    # --- JSON round trip -------------------------------------------------------------

    def to_dict(self) -> dict:
        """The quantize_config.json / quantization_config keys the ecosystem reads."""
        d = {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": self.lm_head,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": "bluelm-quant", "mse_clip": self.mse_clip},
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "quantization config") -> "QuantConfig":
        d = dict(d)
        method = d.pop("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise QuantConfigError(
                f"{source}: quant_method={method!r}; bluelm-quant reads GPTQ checkpoints only"
            )
        if "bits" not in d:
            raise QuantConfigError(f"{source}: has no 'bits' key")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "mse_clip"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        meta = d.pop("meta", None) or {}
        kwargs["mse_clip"] = bool(meta.get("mse_clip", False))
        d.pop("pack_dtype", None)
        # Older configs spell the format "gptq" implicitly; `is_marlin_format` etc. stay in extra.
        try:
            return cls(**kwargs, extra=d)
        except TypeError as e:
            raise QuantConfigError(f"{source}: {e}") from None

    def save(self, directory: str) -> str:
        path = os.path.join(directory, "quantize_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str) -> "QuantConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise QuantConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=path)
