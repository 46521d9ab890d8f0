"""BlueLM-7B: config, architecture, tokenizer and chat format (docs/BLUELM.md).

Importing this package registers nothing; `bluelm_quant.auto.register_auto_classes()` makes
transformers' Auto classes resolve model_type "BlueLM" to these classes.
"""
from .configuration_bluelm import BlueLMConfig, BlueLMConfigError
from .modeling_bluelm import BlueLMForCausalLM, BlueLMModel, BlueLMPreTrainedModel
from .tokenization_bluelm import BlueLMTokenizer, BlueLMTokenizerError

__all__ = [
    "BlueLMConfig",
    "BlueLMConfigError",
    "BlueLMForCausalLM",
    "BlueLMModel",
    "BlueLMPreTrainedModel",
    "BlueLMTokenizer",
    "BlueLMTokenizerError",
]
