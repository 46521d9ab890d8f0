"""Hugging Face glue: open any model directory bluelm-quant knows, with its tokenizer; and an
opt-in route for `AutoModelForCausalLM.from_pretrained` on 4-bit directories.

`load_model_and_tokenizer(path)` takes a full-precision directory, a standard GPTQ one
(quantize_config.json or config.json `quantization_config`), or the legacy
BlueLM-7B-Chat-4bits one (no quantization config at all: only its `*.qweight` tensors say it is
4-bit), and checks that the tokenizer fits the checkpoint's embedding.

`enable()` makes transformers load GPTQ checkpoints with our QuantLinear. transformers maps
`quantization_config.quant_method == "gptq"` to its own GPTQ quantizer (which needs optimum +
gptqmodel), and its `register_quantizer` refuses a name that is already taken; so `enable()`
swaps the "gptq" entry of transformers' quantizer table, and `disable()` puts the original back.
Nothing changes until it is called; `with enabled():` limits it to a block.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from transformers.quantizers.base import HfQuantizer

from .shards import CheckpointError, ShardReader

log = logging.getLogger(__name__)

# Checkpoints pad the embedding past the tokenizer so its row count is a multiple of 8..128
# (BlueLM: 100002 tokens -> 100008 rows, 100004 -> 100096). More than that is not padding.
EMBEDDING_PAD_MULTIPLE = 128


def quantized_layout(path: str) -> str | None:
    """How a local directory says it is 4-bit: "config.json" (a quantization_config block, what
    transformers looks for), "quantize_config.json" (AutoGPTQ), "tensors" (only `*.qweight`
    tensors: BlueLM-7B-Chat-4bits), or None (full precision, or not a model directory)."""
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            if json.load(f).get("quantization_config"):
                return "config.json"
    if os.path.isfile(os.path.join(path, "quantize_config.json")):
        return "quantize_config.json"
    if not os.path.isdir(path):
        return None
    try:
        reader = ShardReader(path)  # index files, safetensors headers, or a memory-mapped .bin
    except CheckpointError:
        return None
    return "tensors" if any(key.endswith(".qweight") for key in reader.keys()) else None


def is_quantized_dir(path: str) -> bool:
    """True for a GPTQ directory, including the legacy layout that names no quantization config."""
    return quantized_layout(path) is not None


def tokenizer_vocab_mismatch(rows: int, tokenizer) -> str | None:
    """Why a checkpoint with `rows` embedding rows does not fit `tokenizer`, or None if it does.

    Fits: rows >= len(tokenizer) (base vocabulary + added tokens), with at most the padding up to
    the next multiple of EMBEDDING_PAD_MULTIPLE beyond it. The published configs' vocab_size is not
    compared: it disagrees with BlueLM's own tensors (100096 vs 100008).
    """
    total, base = len(tokenizer), tokenizer.vocab_size
    added = total - base
    sizes = f"the tokenizer has {total} tokens ({base} in its base vocabulary + {added} added)"
    if rows < base:
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: even the base vocabulary does not fit, "
                "so the tokenizer belongs to another model; copy the tokenizer files of this checkpoint")
    if rows < total:
        missing = [str(tokenizer.convert_ids_to_tokens(i)) for i in range(rows, total)]
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: ids {rows}..{total - 1} "
                f"({', '.join(missing)}) have no embedding row and fail if used; "
                "remove those added tokens or use this checkpoint's tokenizer files")
    padded = -(-total // EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    if rows > padded:
        return (f"the checkpoint's embedding has {rows} rows but {sizes}: ids {total}..{rows - 1} have no token "
                f"(more than padding to a multiple of {EMBEDDING_PAD_MULTIPLE}); the tokenizer may belong to "
                "another model")
    return None


def load_model_and_tokenizer(path: str, device="cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local directory, full precision or 4-bit, in eval mode.

    The tokenizer is loaded first so a missing tokenizer.model fails before gigabytes of weights
    are read. dtype: compute dtype (default: the config's torch_dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models  # noqa: F401  (registers BlueLM with the Auto classes)

    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; pass a local model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face model directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if is_quantized_dir(path):
        from .checkpoint import load_quantized

        model = load_quantized(path, device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    problem = tokenizer_vocab_mismatch(model.get_input_embeddings().num_embeddings, tokenizer)
    if problem:
        log.warning("%s: %s", path, problem)
    return model, tokenizer


# --- AutoModelForCausalLM.from_pretrained -----------------------------------------------


class BlueLMQuantHfQuantizer(HfQuantizer):
    """Loads a pre-quantized GPTQ checkpoint into QuantLinear layers inside from_pretrained.

    The layout is read from the checkpoint directory itself (quantize_config.json, config.json,
    or the tensor shapes for the legacy layout), exactly as `load_quantized` reads it; the
    transformers-side config only routes the load here.
    """

    # Quantizing a full-precision model goes through tools/quantize.py, not from_pretrained.
    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.reader: ShardReader | None = None
        self.quantized: list[str] = []

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError(
                f"bluelm_quant.hf loads a 4-bit model onto one device; got device_map={device_map}. "
                "Pass device_map=None (CPU) or a single device such as device_map='cuda:0'"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .checkpoint import _swap_quantized_linears, read_quant_config

        if not checkpoint_files:
            raise CheckpointError("from_pretrained found no weight files to load the 4-bit layers from")
        path = os.path.dirname(checkpoint_files[0])
        self.reader = ShardReader(path)
        self.config, legacy = read_quant_config(path, self.reader)
        # The skeleton is on the meta device in the requested dtype; scales are cast to it on load.
        self.quantized = _swap_quantized_linears(model, self.reader, self.config, legacy, model.dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .packing import convert_qzeros
        from .quantizer import default_g_idx

        for name in self.quantized:
            layer = model.get_submodule(name)
            if f"{name}.g_idx" not in self.reader:  # legacy layout: contiguous groups
                layer.g_idx = default_g_idx(layer.in_features, layer.group_size).to(layer.qweight.device)
            if self.config.checkpoint_format == "gptq_v2":
                layer.qzeros = convert_qzeros(layer.qzeros, layer.bits, "gptq_v2", "gptq")
            layer.post_init()
        model.quant_config = self.config
        self.reader.close()
        return model

    def is_serializable(self):
        return False  # save with bluelm_quant.checkpoint.save_quantized

    @property
    def is_trainable(self) -> bool:
        return False


_replaced: list = []  # the quantizer class enable() took the "gptq" slot from


def _quantizer_table() -> dict:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZER_MAPPING


def is_enabled() -> bool:
    return _quantizer_table().get("gptq") is BlueLMQuantHfQuantizer


def enable() -> None:
    """Route transformers' GPTQ loading (quant_method "gptq") to bluelm-quant until `disable()`.

    Also lets BlueLMForCausalLM.from_pretrained load 4-bit BlueLM directories whose config.json has
    no quantization_config (AutoGPTQ's quantize_config.json, the legacy BlueLM-7B-Chat-4bits).
    Quantizing with `GPTQConfig(dataset=...)` is not available while enabled.
    """
    table = _quantizer_table()
    if table.get("gptq") is BlueLMQuantHfQuantizer:
        return
    _replaced.append(table.get("gptq"))
    table["gptq"] = BlueLMQuantHfQuantizer
    log.info("transformers' GPTQ loading now goes through bluelm_quant (bluelm_quant.hf.disable() undoes it)")


def disable() -> None:
    """Give transformers its own GPTQ quantizer back."""
    table = _quantizer_table()
    if table.get("gptq") is BlueLMQuantHfQuantizer and _replaced:
        original = _replaced.pop()
        if original is None:
            del table["gptq"]
        else:
            table["gptq"] = original


@contextlib.contextmanager
def enabled():
    """`enable()` for the duration of a with-block (restores the previous state)."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


def routing_quantization_config(path: str) -> dict | None:
    """The quantization_config to hand transformers for a 4-bit directory whose config.json has
    none, so that from_pretrained reaches BlueLMQuantHfQuantizer; None if it needs none.

    Raises CheckpointError while `enable()` is off: transformers would otherwise build plain
    Linear layers, report the 4-bit tensors as unexpected and run with random weights.
    """
    layout = quantized_layout(path)
    if layout in (None, "config.json"):
        return None
    if not is_enabled():
        raise CheckpointError(
            f"{path} is a 4-bit checkpoint ({'AutoGPTQ quantize_config.json' if layout == 'quantize_config.json' else 'legacy BlueLM-7B-Chat-4bits'} "
            "layout) whose config.json has no quantization_config, so from_pretrained would load random weights. "
            "Load it with bluelm_quant.checkpoint.load_quantized(path), or call bluelm_quant.hf.enable() first"
        )
    from .checkpoint import read_quant_config

    config, _ = read_quant_config(path)
    return config.to_dict()


__all__ = ["BlueLMQuantHfQuantizer", "EMBEDDING_PAD_MULTIPLE", "disable", "enable", "enabled", "is_enabled",
           "is_quantized_dir", "load_model_and_tokenizer", "quantized_layout", "routing_quantization_config",
           "tokenizer_vocab_mismatch"]
