"""Model families as small data descriptions, and their registry.

A family says where the decoder layers are, which modules run before them, and the
groups of Linear layers in forward order. The Linears of one group read the same input;
in true-sequential GPTQ each group is quantized after the groups before it, so it sees
their quantized outputs. Adding a LLaMA-like family is a few lines: a ModelSpec and an
entry in FAMILIES.

Nothing in models/ imports the rest of bluelm_quant: the package depends on the model
families, never the other way round (tests/test_structure.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this spec covers
    layers: str  # the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # Linear groups inside a layer, forward order
    before: tuple[str, ...] = ()  # modules that run before the first layer (for capture)
    # modules that turn the last layer's output into logits, applied in order
    after: tuple[str, ...] = ("model.norm", "lm_head")
    # (module, Linear) pairs where the module's output is that Linear applied to its input
    # (plus outputs the layer drops): later passes replay the Linear instead (memo.py).
    tails: tuple[tuple[str, str], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized Linear of a decoder layer (relative names), in forward order."""
        return tuple(n for group in self.sequential for n in group)

    def layer_name(self, index: int) -> str:
        """The qualified name of decoder layer `index` ("model.layers.7")."""
        return f"{self.layers}.{index}"


LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LLAMA_TAILS = (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))

LLAMA = ModelSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    sequential=LLAMA_SEQUENTIAL,
    before=("model.embed_tokens", "model.rotary_emb"),
    tails=LLAMA_TAILS,
)

BLUELM = ModelSpec(
    name="bluelm",
    model_types=("BlueLM", "bluelm"),
    layers="model.layers",
    sequential=LLAMA_SEQUENTIAL,
    before=("model.embed_tokens", "model.embed_layer_norm", "model.rotary_emb"),
    tails=LLAMA_TAILS,
)

FAMILIES = (LLAMA, BLUELM)


class UnsupportedModelError(ValueError):
    """No model-family spec covers this architecture."""


def spec_for(config) -> ModelSpec:
    """The family spec for anything with a `model_type` (a transformers config, a ModelDir)."""
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in FAMILIES for t in s.model_types)
    raise UnsupportedModelError(
        f"model_type {model_type!r} (architectures {getattr(config, 'architectures', None)}) has no "
        f"model-family spec; supported: {', '.join(known)}. To add a LLaMA-like family, add a "
        "ModelSpec naming its decoder-layer list and Linear groups to bluelm_quant/models/__init__.py"
    )

