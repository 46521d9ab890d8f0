"""QuantConfig: the one description of how a model is quantized.

It round-trips through `quantize_config.json` and through the `quantization_config`
block of `config.json` in the form transformers / optimum / vLLM / GPTQModel read
(docs/CHECKPOINTS.md).

Act-order comes in two kinds. "static" (desc_act with static_groups) quantizes columns by
decreasing Hessian diagonal but fixes each group's grid before reordering, so g_idx stays
k // group_size and the layout is the plain one: the config says `desc_act: false` (vLLM
refuses `desc_act: true`) and `meta.act_order: "static"` records how it was made. "dynamic"
(desc_act alone) lets groups follow the quantization order: a permuted g_idx that only some
engines read, written as `desc_act: true`.

`dynamic` holds per-module overrides in GPTQModel's form, which vLLM and GPTQModel read:
{"+:regex": {"group_size": 64}, "-:regex": {}} (first match of the module name wins; "-:"
leaves a module unquantized).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 zeros (stored zero - 1) / true zeros
ACT_ORDERS = ("off", "static", "dynamic")
CLIP_WEIGHTS = ("uniform", "hessian")
# What a `dynamic` rule may change for the modules it matches.
OVERRIDABLE = ("bits", "group_size", "sym", "desc_act")


class QuantConfigError(ValueError):
    """A quantization setting is invalid or disagrees with the tensors."""


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output channel (per-channel)
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with desc_act: groups fixed before reordering ("static" act-order)
    true_sequential: bool = True
    damp_percent: float = 0.01
    mse_clip: bool = False  # search a clipped range that minimises the grid's MSE
    clip_weights: str = "uniform"  # "hessian": GPTQ's clip search weighs each column by its Hessian diagonal
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    dynamic: dict = field(default_factory=dict)  # per-module overrides (see the module docstring)
    extra: dict = field(default_factory=dict)  # unknown keys kept for the round trip

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(
                f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}"
            )
        _check_group_size(self.group_size, "group_size")
        if not 0.0 < self.damp_percent < 1.0:
            raise QuantConfigError(
                f"damp_percent={self.damp_percent} must be in (0, 1); 0.01 is the usual value"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise QuantConfigError(
                f"checkpoint_format={self.checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}"
            )
        if self.clip_weights not in CLIP_WEIGHTS:
            raise QuantConfigError(f"clip_weights={self.clip_weights!r} is not one of {CLIP_WEIGHTS}")
        if not isinstance(self.dynamic, dict):
            raise QuantConfigError(f"dynamic must be a dict of regex -> overrides, got {type(self.dynamic).__name__}")
        for pattern, overrides in self.dynamic.items():
            _check_rule(pattern, overrides)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def act_order(self) -> str:
        """'off', 'static' (monotone g_idx: the plain layout) or 'dynamic' (permuted g_idx)."""
        if not self.desc_act or self.group_size == -1:  # per-channel: one group, order is moot for the layout
            return "static" if self.desc_act else "off"
        return "static" if self.static_groups else "dynamic"

    def groups(self, in_features: int) -> int:
        """Number of quantization groups along in_features (the last may be partial)."""
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def for_module(self, name: str) -> "QuantConfig | None":
        """The settings of module `name` after the first `dynamic` rule it matches (None: left
        unquantized by a "-:" rule)."""
        for pattern, overrides in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    return None
            elif re.match(pattern.removeprefix("+:"), name):
                return dataclasses.replace(self, dynamic={}, **{k: v for k, v in overrides.items() if k in OVERRIDABLE})
        return self

    # --- JSON round trip -------------------------------------------------------------

    def to_dict(self) -> dict:
        """The quantize_config.json / quantization_config keys the ecosystem reads."""
        meta = {"quantizer": "bluelm-quant", "mse_clip": self.mse_clip, "act_order": self.act_order}
        if self.mse_clip:
            meta["clip_weights"] = self.clip_weights
        meta.update(self.extra.get("meta", {}))  # another tool's record (a converted checkpoint) stays
        d = {
            "bits": self.bits,
            "group_size": self.group_size,
            # The layout, not the method: static act-order leaves g_idx monotone.
            "desc_act": self.act_order == "dynamic",
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": self.lm_head,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
        }
        if self.dynamic:
            d["dynamic"] = self.dynamic
        d.update({k: v for k, v in self.extra.items() if k != "meta"})
        d["meta"] = meta
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
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "mse_clip", "clip_weights"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        kwargs["dynamic"] = kwargs.get("dynamic") or {}
        meta = dict(d.pop("meta", None) or {})
        kwargs["mse_clip"] = bool(meta.pop("mse_clip", False))
        kwargs["clip_weights"] = meta.pop("clip_weights", "uniform")
        act_order = meta.pop("act_order", None)
        if act_order == "static":  # written as desc_act false: the layout is the plain one
            kwargs.update(desc_act=True, static_groups=True)
        elif act_order == "dynamic":
            kwargs["desc_act"] = True
        if meta.get("quantizer") == "bluelm-quant":
            del meta["quantizer"]  # ours: to_dict writes it again
        if meta:
            d["meta"] = meta
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


def _check_group_size(gs, what: str) -> None:
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % 8 == 0)):
        raise QuantConfigError(f"{what}={gs!r} must be -1 (per-channel) or a positive multiple of 8")


def _check_rule(pattern, overrides) -> None:
    if not isinstance(pattern, str) or not isinstance(overrides, dict):
        raise QuantConfigError(f"dynamic rule {pattern!r}: {overrides!r} must map a regex to a dict of overrides")
    try:
        re.compile(pattern[2:] if pattern.startswith(("+:", "-:")) else pattern)
    except re.error as e:
        raise QuantConfigError(f"dynamic rule {pattern!r} is not a valid regex: {e}") from None
    if "group_size" in overrides:
        _check_group_size(overrides["group_size"], f"dynamic rule {pattern!r}: group_size")
    if "bits" in overrides and overrides["bits"] not in SUPPORTED_BITS:
        raise QuantConfigError(f"dynamic rule {pattern!r}: bits={overrides['bits']!r} is not one of {SUPPORTED_BITS}")
