"""BlueLM in transformers' Auto classes: one explicit, idempotent registration.

`register_auto_classes()` makes AutoConfig / AutoModel / AutoModelForCausalLM /
AutoTokenizer resolve model_type "BlueLM" to bluelm_quant's classes, so a BlueLM directory
loads without `trust_remote_code` (its config's `auto_map` points at remote .py files that
need not exist). `import bluelm_quant` calls it, and so does every loader of this package.

AutoModelForCausalLM resolves BlueLM to `BlueLMLoader`, which builds a BlueLMForCausalLM
the way the directory's tensors say (ModelDir): the embedding rows from the checkpoint
(published configs say 100096 where a checkpoint holds 100008), and 4-bit directories
whose config.json names no quantization_config (AutoGPTQ's quantize_config.json, the
legacy BlueLM-7B-Chat-4bits) routed to bluelm_quant.hf when it is enabled, refused
otherwise: transformers would load them as a model with random weights.
"""
from __future__ import annotations

import copy
import os

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .models.bluelm import BlueLMConfig, BlueLMForCausalLM, BlueLMModel, BlueLMTokenizer
from .hf_quantizer import is_enabled
from .modeldir import CONFIG_FILE, ModelDir
from .shards import CheckpointError

LAYOUT_NAMES = {"quantize_config.json": "AutoGPTQ quantize_config.json", "tensors": "legacy BlueLM-7B-Chat-4bits"}


class BlueLMLoader:
    """What AutoModelForCausalLM finds for a BlueLM config: a factory of BlueLMForCausalLM.

    Not a model class: `from_pretrained` and `_from_config` return BlueLMForCausalLM
    instances (transformers' Auto classes only call these two).
    """

    config_class = BlueLMConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        path = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if config is not None and os.path.isfile(os.path.join(path, CONFIG_FILE)):
            model_dir = ModelDir(path)
            routing = routing_quantization_config(model_dir)
            config = model_dir.fit_vocab(config)
            if routing is not None:
                config = copy.deepcopy(config)
                config.quantization_config = routing
        return BlueLMForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return BlueLMForCausalLM._from_config(config, **kwargs)


def routing_quantization_config(model_dir: ModelDir) -> dict | None:
    """The quantization_config that routes from_pretrained of a 4-bit directory whose config.json
    names none to bluelm_quant.hf; None if the directory needs none.

    Raises CheckpointError while bluelm_quant.hf is not enabled.
    """
    if model_dir.quant is None or model_dir.config_json_names_quant:
        return None
    if not is_enabled():
        raise CheckpointError(
            f"{model_dir.path} is a 4-bit checkpoint ({LAYOUT_NAMES[model_dir.quant_source]} layout) whose "
            f"{CONFIG_FILE} has no quantization_config, so from_pretrained would load random weights. Load it with "
            "bluelm_quant.load_quantized(path), or call bluelm_quant.hf.enable() first"
        )
    return model_dir.quant.to_dict()


def register_auto_classes() -> None:
    """Register BlueLM with transformers' Auto classes (safe to call any number of times)."""
    AutoConfig.register(BlueLMConfig.model_type, BlueLMConfig, exist_ok=True)
    AutoModel.register(BlueLMConfig, BlueLMModel, exist_ok=True)
    AutoModelForCausalLM.register(BlueLMConfig, BlueLMLoader, exist_ok=True)
    AutoTokenizer.register(BlueLMConfig, tokenizer_class=BlueLMTokenizer, exist_ok=True)


__all__ = ["BlueLMLoader", "register_auto_classes", "routing_quantization_config"]
