"""How vLLM sizes a BlueLM model, and the BlueLM configs our vLLM model refuses.

vLLM derives the facts its engine allocates by (vocabulary size, longest sequence) from
`hf_config` through a per-model_type "architecture config convertor". BlueLM needs two
departures from the generic one (docs/BLUELM.md sections 1-2):

- vocabulary: config.json says 100096 while the 2K chat checkpoint has 100008 embedding rows.
  The engine (logits width, prompt-id validation, sampler buffers) and the model's embedding /
  lm_head must all use the checkpoint's row count, as BlueLMForCausalLM.from_pretrained does.
- context: the ntkmixed models precompute cos/sin over 2048 * int(factor) positions, which
  BlueLMConfig.context_length already accounts for; vLLM multiplies the length it derives by the
  RoPE factor, so we hand it context_length / factor.

Importing this module imports vLLM; only the plugin's register() does so.
"""
from __future__ import annotations

import json
import os

import vllm.config  # noqa: F401  (first: importing the convertor module alone is circular in vLLM 0.32)
from vllm.transformers_utils.model_arch_config_convertor import (
    MODEL_ARCH_CONFIG_CONVERTORS,
    ModelArchConfigConvertorBase,
)

from .modeldir import ModelDir
from .models.bluelm.configuration_bluelm import BlueLMConfig, BlueLMConfigError

# RoPE types whose cos/sin vLLM can precompute once for every position. transformers' "dynamic"
# NTK recomputes the frequencies from each sequence's length, which a batched engine cannot.
SERVED_ROPE_TYPES = ("default", "linear", "ntkmixed")
# config.json keys that define tensor shapes. BlueLMConfig has BlueLM-7B defaults for them, so a
# config that omits one would silently describe a different model than its checkpoint holds.
REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_servable(config) -> None:
    """Raise BlueLMConfigError, naming the field, if our vLLM BlueLM cannot run `config`.

    BlueLMConfig itself already refuses unknown RoPE types and malformed rope_scaling dicts
    when vLLM loads config.json; this adds what only the vLLM model lacks.
    """
    if not isinstance(config, BlueLMConfig):
        raise BlueLMConfigError(
            f"expected a BlueLMConfig, got {type(config).__name__}: config.json must say "
            f'"model_type": "BlueLM" for architecture BlueLMForCausalLM'
        )
    if config.rope_type not in SERVED_ROPE_TYPES:
        raise BlueLMConfigError(
            f"rope_scaling type {config.rope_type!r} is not served by vLLM's BlueLM (it serves "
            f"{list(SERVED_ROPE_TYPES)}): the dynamic type rescales RoPE per sequence length, which "
            "vLLM's precomputed cos/sin table cannot do; use bluelm_quant.load_quantized / transformers"
        )
    if config.hidden_act != "silu":
        raise BlueLMConfigError(f"hidden_act={config.hidden_act!r}: BlueLM's MLP is SiLU-gated; only 'silu' is served")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag):
            raise BlueLMConfigError(f"{flag}=true: BlueLM has no Linear biases and vLLM's BlueLM does not load them")


def check_config_file(model_dir: str) -> None:
    """Refuse a local config.json that leaves out a shape-defining key (see REQUIRED_CONFIG_KEYS)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in raw]
    if missing:
        raise BlueLMConfigError(
            f"{path} has no {', '.join(repr(k) for k in missing)}; BlueLM's defaults would describe the "
            "7B model, not necessarily this checkpoint: add the key(s) to config.json"
        )


def checkpoint_vocab_rows(config) -> int | None:
    """Embedding rows of the local checkpoint `config` was read from (None if not local)."""
    model_dir = getattr(config, "name_or_path", None) or ""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return None
    checkpoint = ModelDir(model_dir)
    return checkpoint.embedding_rows if checkpoint.has_weights() else None


class BlueLMArchConfigConvertor(ModelArchConfigConvertorBase):
    """vLLM's view of a BlueLM config; runs where vLLM builds its ModelConfig, before any engine."""

    def convert(self, supports_multimodal: bool = True):
        check_servable(self.hf_config)
        model_dir = getattr(self.hf_config, "name_or_path", None) or ""
        if os.path.isdir(model_dir):
            check_config_file(model_dir)
        return super().convert(supports_multimodal)

    def get_vocab_size(self) -> int:
        rows = checkpoint_vocab_rows(self.hf_config)
        return rows if rows is not None else super().get_vocab_size()

    def derive_max_model_len_and_key(self) -> tuple[float, str | None]:
        config = self.hf_config
        if config.rope_type == "ntkmixed":
            # vLLM multiplies this by rope_scaling.factor (config/model.py, _get_and_verify_max_len).
            return config.context_length / config.rope_parameters["factor"], "context_length (ntkmixed)"
        return super().derive_max_model_len_and_key()


def register_arch_config() -> None:
    """Use BlueLMArchConfigConvertor for model_type "BlueLM" (idempotent)."""
    MODEL_ARCH_CONFIG_CONVERTORS[BlueLMConfig.model_type] = BlueLMArchConfigConvertor


__all__ = [
    "BlueLMArchConfigConvertor",
    "REQUIRED_CONFIG_KEYS",
    "SERVED_ROPE_TYPES",
    "check_config_file",
    "check_servable",
    "checkpoint_vocab_rows",
    "register_arch_config",
]
