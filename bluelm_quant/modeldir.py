"""ModelDir: one local Hugging Face model directory, read once.

Everything that opens a model directory (loading, the quantization pipeline, the
transformers integration) asks a ModelDir instead of reading files itself:

  config          config.json as a dict (read when the ModelDir is made)
  quant           its QuantConfig, or None for a full-precision model
  layout          "full", "gptq" (v1 zeros), "gptq_v2" (true zeros) or "legacy"
  quant_source    where `quant` came from: "quantize_config.json", "config.json", "tensors"
  reader          the ShardReader over its weight files (opened on first use)
  embedding_rows  rows of the token embedding, from the tensors (not config.json)
  dtype           the dtype config.json names (float16 when it names none)

The legacy layout is vivo's BlueLM-7B-Chat-4bits: no quantization config at all, only
`*.qweight` tensors say it is 4-bit (docs/CHECKPOINTS.md).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from functools import cached_property

import torch

from .config import QuantConfig
from .shards import CheckpointError, ShardReader

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"


class ModelDir:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is not a directory; pass a local Hugging Face model directory")
        config_path = os.path.join(self.path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{self.path} has no {CONFIG_FILE}; it is not a Hugging Face model directory")
        self.config: dict = _read_json(config_path)

    def __repr__(self) -> str:
        return f"ModelDir({self.path!r})"

    # --- config.json -----------------------------------------------------------------

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str] | None:
        return self.config.get("architectures")

    @property
    def dtype(self) -> torch.dtype:
        """config.json's torch_dtype (transformers 5 writes `dtype`); float16 when it names none."""
        named = self.config.get("torch_dtype") or self.config.get("dtype") or "float16"
        dtype = getattr(torch, str(named).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}/{CONFIG_FILE} names torch_dtype={named!r}, which is not a torch dtype")
        return dtype

    # --- weights ---------------------------------------------------------------------

    @cached_property
    def reader(self) -> ShardReader:
        return ShardReader(self.path)

    def has_weights(self) -> bool:
        try:
            self.reader
        except CheckpointError:
            return False
        return True

    def close(self) -> None:
        """Drop the weight files' handles (memory maps); the reader reopens them if used again."""
        if "reader" in self.__dict__:
            self.reader.close()

    @cached_property
    def embedding_rows(self) -> int | None:
        """Rows of `*embed_tokens.weight` in the tensors, or None if there is none.

        Checkpoints may disagree with config.json (BlueLM: 100008 rows, vocab_size 100096);
        the tensors win. An lm_head with another row count is an inconsistent checkpoint.
        """
        embed = next((k for k in self.reader.keys() if k.endswith("embed_tokens.weight")), None)
        if embed is None:
            return None
        rows = self.reader.shape(embed)[0]
        for key, dim in (("lm_head.weight", 0), ("lm_head.qweight", 1)):
            if key in self.reader and self.reader.shape(key)[dim] != rows:
                raise CheckpointError(
                    f"{self.path}: {embed} has {rows} rows but {key} has shape {list(self.reader.shape(key))}; "
                    "the checkpoint is inconsistent, re-export it"
                )
        return rows

    # --- quantization ----------------------------------------------------------------

    @cached_property
    def _quant(self) -> tuple[QuantConfig | None, str | None]:
        qc_path = os.path.join(self.path, QUANTIZE_CONFIG_FILE)
        if os.path.isfile(qc_path):
            return QuantConfig.load(qc_path), QUANTIZE_CONFIG_FILE
        if self.config_json_names_quant:
            return QuantConfig.from_dict(self.config["quantization_config"], source=f"{self.path}/{CONFIG_FILE} quantization_config"), CONFIG_FILE
        if self.has_weights() and any(k.endswith(".qweight") for k in self.reader.keys()):
            if any(k.endswith(".g_idx") for k in self.reader.keys()):
                raise CheckpointError(self._missing_config_message())
            # Legacy BlueLM-7B-Chat-4bits: bits from the config if it says, group size from shapes.
            bits = self.config.get("quantization_bit", self.config.get("bits", 4))
            return QuantConfig(bits=int(bits), group_size=-1, sym=False), "tensors"
        return None, None

    def _missing_config_message(self) -> str:
        """For quantized tensors in the standard GPTQ layout (with g_idx: not the legacy layout) and
        no quantization config: what is missing, and what the tensors say."""
        reader = self.reader
        name = sorted(k for k in reader.keys() if k.endswith(".qweight"))[0][: -len(".qweight")]
        shapes = {s: reader.shape(f"{name}.{s}") for s in ("qweight", "scales", "g_idx") if f"{name}.{s}" in reader}
        described = ", ".join(f"{name}.{s} {list(shape)}" for s, shape in shapes.items())
        guess = ""
        if len(shapes) == 3 and shapes["g_idx"] and shapes["g_idx"][0]:
            k = shapes["g_idx"][0]
            bits, groups = shapes["qweight"][0] * 32 / k, shapes["scales"][0]
            group_size = -1 if groups == 1 else -(-k // groups)
            g_idx = reader.get(f"{name}.g_idx")
            act_order = bool((g_idx[1:] < g_idx[:-1]).any())
            guess = f" (bits={bits:g}, group_size={group_size}, desc_act={str(act_order).lower()})"
        return (
            f"{self.path} has quantized GPTQ tensors (*.qweight, *.g_idx) but no quantization config: no {QUANTIZE_CONFIG_FILE} and no "
            f"quantization_config in {CONFIG_FILE}, so its bits, group size, act-order and grid are unknown. "
            f"Its tensors look like {described}{guess}. Restore the {QUANTIZE_CONFIG_FILE} that came with the "
            "checkpoint (or write one with those values and its \"sym\"); only the legacy BlueLM-7B-Chat-4bits "
            "layout (no g_idx tensors) is read without one"
        )

    @property
    def quant(self) -> QuantConfig | None:
        return self._quant[0]

    @property
    def quant_source(self) -> str | None:
        return self._quant[1]

    @property
    def config_json_names_quant(self) -> bool:
        """config.json has a quantization_config block (what transformers' from_pretrained looks for)."""
        return isinstance(self.config.get("quantization_config"), dict)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    @property
    def layout(self) -> str:
        if self.quant is None:
            return "full"
        if self.quant_source == "tensors":
            return "legacy"
        return self.quant.checkpoint_format

    def require_quant(self) -> QuantConfig:
        """The QuantConfig, or an error that says what is missing."""
        if self.quant is None:
            raise CheckpointError(
                f"{self.path} is not a quantized checkpoint: it has no {QUANTIZE_CONFIG_FILE}, no quantization_config "
                f"in {CONFIG_FILE} and no *.qweight tensors. Load it with transformers, or quantize it first"
            )
        return self.quant

    # --- transformers ----------------------------------------------------------------

    def load_tokenizer(self):
        """transformers' AutoTokenizer for this directory (for BlueLM, call
        bluelm_quant.auto.register_auto_classes() first); a directory without usable
        tokenizer files is a CheckpointError naming it."""
        from transformers import AutoTokenizer

        from .models.bluelm import BlueLMConfigError, BlueLMTokenizerError

        self._check_model_type()
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (BlueLMConfigError, BlueLMTokenizerError):
            raise  # already one line that names the file
        except (OSError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot load the tokenizer of {self.path} ({first}); copy the tokenizer files "
                "(tokenizer.json or tokenizer.model, tokenizer_config.json) of this model into it"
            ) from e

    def hf_config(self, **overrides):
        """The transformers config of this directory for building a model skeleton (for BlueLM,
        call bluelm_quant.auto.register_auto_classes() first).

        vocab_size follows the embedding rows; the quantization_config block is dropped
        (bluelm_quant builds the quantized layers itself).
        """
        from transformers import AutoConfig

        from .models.bluelm import BlueLMConfigError

        self._check_model_type()
        try:
            config = AutoConfig.from_pretrained(self.path, **overrides)
        except BlueLMConfigError:
            raise  # already one line that names the file
        except (OSError, ValueError, KeyError) as e:  # e.g. a model_type transformers does not know
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read {self.path}/{CONFIG_FILE} as a transformers config: {first}") from e
        config = self.fit_vocab(config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config

    def _check_model_type(self) -> None:
        """A model_type transformers does not know fails here, in one line (transformers would
        log a warning about instantiating it first, then raise)."""
        from transformers import CONFIG_MAPPING

        model_type = self.model_type
        if model_type is not None and model_type not in CONFIG_MAPPING:
            import transformers

            raise CheckpointError(
                f"{self.path}/{CONFIG_FILE} names model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know (and bluelm-quant does not implement); check config.json, "
                "or use a transformers version that has this model"
            )

    def fit_vocab(self, config):
        """`config`, or a copy of it with vocab_size set to the checkpoint's embedding rows."""
        rows = self.embedding_rows if self.has_weights() else None
        if rows is None or getattr(config, "vocab_size", rows) == rows:
            return config
        log.warning("%s: config vocab_size=%s but the embedding has %d rows; using the checkpoint's", self.path,
                    config.vocab_size, rows)
        config = copy.deepcopy(config)
        config.vocab_size = rows
        return config


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


__all__ = ["CONFIG_FILE", "ModelDir", "QUANTIZE_CONFIG_FILE"]
