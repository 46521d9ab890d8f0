"""What the main serving engines accept, so that we never write, without saying so, a
checkpoint they refuse (vLLM 0.32, GPTQModel, transformers + optimum; the measurements
behind each rule are in docs/CHECKPOINTS.md, "Who loads what").
"""
from __future__ import annotations

from typing import Iterable

from .config import QuantConfig

# vLLM's GPTQ path: group sizes it allocates scales for (every platform), symmetric 4/8-bit.
VLLM_GROUP_SIZES = (-1, 32, 64, 128)


def engine_notes(config: QuantConfig) -> list[str]:
    """Why vLLM would refuse a checkpoint with these settings (empty: it serves it)."""
    notes = []
    if not config.sym:
        notes.append("asymmetric zeros: vLLM's GPTQ path serves symmetric checkpoints only "
                     "(GPTQModel and transformers load it)")
    if config.bits != 4:
        notes.append(f"{config.bits}-bit: vLLM's GPTQ path serves 4-bit (and symmetric 8-bit on GPUs) only")
    if config.group_size not in VLLM_GROUP_SIZES:
        notes.append(f"group size {config.group_size}: vLLM accepts {VLLM_GROUP_SIZES} only")
    if config.act_order == "dynamic":
        notes.append("dynamic act-order (desc_act true): vLLM refuses it; static act-order (the default) does not")
    return notes


def partial_group_widths(group_size: int, in_features: Iterable[int]) -> list[int]:
    """The layer widths `group_size` leaves a partial last group in (vLLM and GPTQModel's fused
    kernels refuse those, and vLLM's row-parallel layers silently drop the partial group)."""
    return sorted({k for k in in_features if group_size != -1 and k % group_size})


def dividing_group_size(group_size: int, in_features: Iterable[int]) -> int | None:
    """The largest group size every engine accepts, at most `group_size`, that divides every width
    (a whole-model size: transformers does not read per-module overrides); None if none does."""
    widths = set(in_features)
    for candidate in (g for g in (128, 64, 32) if g <= group_size):
        if all(k % candidate == 0 for k in widths):
            return candidate
    return None


__all__ = ["VLLM_GROUP_SIZES", "dividing_group_size", "engine_notes", "partial_group_widths"]
