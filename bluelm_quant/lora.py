"""LoRA adapters on 4-bit models, through PEFT (the optional extra: pip install 'bluelm-quant[lora]').

    from peft import LoraConfig
    from bluelm_quant import load_quantized, lora

    model = load_quantized("out/model-gptq-4bit-g128")
    model = lora.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ...train...; model.save_pretrained("adapter")            # PEFT's standard files
    model = lora.load_adapter(load_quantized(...), "adapter")  # PeftModel.from_pretrained

PEFT knows nn.Linear and a few other libraries' layers; for any other layer type it offers
one extension point, a per-config mapping `LoraConfig._register_custom_module({layer type:
LoRA layer type})`. `register(config)` adds ours (QuantLinear -> lora_layer.QuantLoraLinear)
and returns the config, so raw PEFT works too:

    peft.get_peft_model(model, lora.register(LoraConfig(...)))
    peft.PeftModel.from_pretrained(model, "adapter", config=lora.register(LoraConfig.from_pretrained("adapter")))

The mapping lives on each config object and is not saved with the adapter, so every
LoraConfig used on a 4-bit model passes through `register` (the helpers here do it).
`get_peft_model` also resolves "all-linear" (PEFT's own expansion counts nn.Linear only,
so it would skip every QuantLinear) and checks the targets, rank and, on loading, the
adapter's shapes against this model, each with a one-line LoRAError.

Nothing here imports peft at module import: `import bluelm_quant` works without it.
"""
from __future__ import annotations

import json
import os
import re

from torch import nn

from .nn import QuantLinear

PEFT_REQUIREMENT = "peft>=0.21,<0.22"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's prefix for the base model's modules in an adapter's state dict.
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """A LoRA request does not fit the model, or PEFT is missing."""


def require_peft():
    """The peft module, or a LoRAError that says how to install it."""
    try:
        import peft
    except ImportError as e:
        raise LoRAError(f"LoRA needs PEFT ({e}): pip install 'bluelm-quant[lora]' (installs {PEFT_REQUIREMENT})") from None
    return peft


def custom_modules() -> dict[type, type]:
    """The mapping for LoraConfig._register_custom_module: our layer type -> its LoRA layer."""
    require_peft()
    from .lora_layer import QuantLoraLinear

    return {QuantLinear: QuantLoraLinear}


def register(config):
    """`config` (a peft LoraConfig) with our QuantLinear mapping registered; returns it."""
    peft = require_peft()
    if not isinstance(config, peft.LoraConfig):
        raise LoRAError(f"expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module(custom_modules())
    return config


# --- targets ---------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's Linear layers, 4-bit or not (what LoRA can target)."""
    return [name for name, m in model.named_modules() if isinstance(m, (QuantLinear, nn.Linear)) and name]


def _short_list(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(leaves)} (e.g. {names[0]})" if names else "none"


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a regular expression over the full name; a list names suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, config) -> None:
    """Expand "all-linear" to the model's Linear layers (4-bit ones included, lm_head left out)
    and check that every target names a Linear layer; edits config.target_modules in place."""
    targets = config.target_modules
    linears = linear_names(model)
    if targets is None:
        return  # PEFT picks its default for the model type (and says so when it has none)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_names = {n for n, m in model.named_modules() if head is not None and m is head}
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears if n not in head_names})
        if not leaves:
            raise LoRAError("target_modules='all-linear': the model has no Linear layer besides its output head")
        config.target_modules = set(leaves)
        return
    if isinstance(targets, str):
        if not any(_matches(n, targets) for n in linears):
            raise LoRAError(f"target_modules={targets!r} matches no Linear layer; the model's Linear layers are: {_short_list(linears)}")
        return
    missing = sorted(t for t in targets if not any(_matches(n, [t]) for n in linears))
    if missing:
        raise LoRAError(f"target modules {missing} match no Linear layer; the model's Linear layers are: {_short_list(linears)}")


def refuse_fused(model: nn.Module) -> None:
    """A LoRAError when the model's projections were fused for inference (fuse.py): an adapter on the
    fused layer would be bypassed, and the separate Linears it would target are gone."""
    from .fuse import FusedMember

    fused = next((name for name, m in model.named_modules() if isinstance(m, FusedMember)), None)
    if fused is not None:
        raise LoRAError(f"{fused} is fused with its neighbours for inference (bluelm_quant.fuse_projections): "
                        "LoRA needs the separate Linears; load the checkpoint again without fusing")


def prepare_config(model: nn.Module, config):
    """register + resolve_targets + a rank check: the config ready for PEFT on this model."""
    refuse_fused(model)
    register(config)
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in (config.rank_pattern or {}).items()}}
    bad = {k: v for k, v in ranks.items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise LoRAError(f"LoRA rank must be a positive integer (8 or 16 are usual), got {', '.join(f'{k}={v}' for k, v in bad.items())}")
    resolve_targets(model, config)
    return config


def get_peft_model(model: nn.Module, config, **kwargs):
    """peft.get_peft_model on a model with QuantLinear layers (any model works)."""
    peft = require_peft()
    return peft.get_peft_model(model, prepare_config(model, config), **kwargs)


# --- loading -----------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise LoRAError(f"{adapter_dir} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def adapter_shapes(adapter_dir: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in the adapter's safetensors file, read from its header only."""
    from safetensors import safe_open

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise LoRAError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (PEFT's standard adapter file)")
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_adapter(model: nn.Module, adapter_dir: str) -> None:
    """A LoRAError naming the module and shapes when the adapter was trained on another base model."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path") or "an unrecorded base"
    hint = f"the adapter was trained on {base}"
    modules = dict(model.named_modules())
    for key, shape in sorted(adapter_shapes(adapter_dir).items()):
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if m is None:
            continue
        name, which = m.groups()
        layer = modules.get(name)
        if layer is None:
            raise LoRAError(f"{adapter_dir} does not fit this model: it adapts {name}, which this model lacks ({hint})")
        if not isinstance(layer, (QuantLinear, nn.Linear)):
            continue
        dim, axis = (layer.in_features, 1) if which == "A" else (layer.out_features, 0)
        if len(shape) != 2 or shape[axis] != dim:
            expected = f"[r, {dim}]" if which == "A" else f"[{dim}, r]"
            raise LoRAError(
                f"{adapter_dir} does not fit this model: {name} is {layer.in_features} -> {layer.out_features} here, "
                f"but the adapter's lora_{which} is {list(shape)} (expected {expected}); {hint}"
            )


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False, adapter_name: str = "default"):
    """PeftModel.from_pretrained(model, adapter_dir) with our layers registered and the shapes checked first."""
    peft = require_peft()
    refuse_fused(model)
    check_adapter(model, adapter_dir)
    config = register(peft.LoraConfig.from_pretrained(adapter_dir))
    return peft.PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


__all__ = ["LoRAError", "PEFT_REQUIREMENT", "adapter_shapes", "check_adapter", "custom_modules", "get_peft_model",
           "linear_names", "load_adapter", "prepare_config", "read_adapter_config", "refuse_fused", "register",
           "resolve_targets"]
