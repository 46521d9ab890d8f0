"""BlueLM as a native transformers model: importing this package registers it.

After `import bluelm_quant.models.bluelm`, AutoConfig / AutoModel / AutoModelForCausalLM /
AutoTokenizer resolve model_type "BlueLM" (and tokenizer_class "BlueLMTokenizer") to our classes.
A BlueLM config.json's `auto_map` (remote code) is then ignored unless the caller passes
trust_remote_code=True, and even then transformers prefers classes registered from outside
its own package for AutoModel (see auto_factory's `explicit_local_code`).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .checkpoint_vocab import CheckpointVocabError, bluelm_vocab_rows_from_checkpoint
from .configuration_bluelm import BlueLMConfig, BlueLMConfigError
from .modeling_bluelm import BlueLMForCausalLM, BlueLMModel, BlueLMPreTrainedModel
from .tokenization_bluelm import BlueLMTokenizer, BlueLMTokenizerError

# exist_ok: re-importing (e.g. importlib.reload in tests) must not fail.
AutoConfig.register(BlueLMConfig.model_type, BlueLMConfig, exist_ok=True)
AutoModel.register(BlueLMConfig, BlueLMModel, exist_ok=True)
AutoModelForCausalLM.register(BlueLMConfig, BlueLMForCausalLM, exist_ok=True)
AutoTokenizer.register(BlueLMConfig, tokenizer_class=BlueLMTokenizer, exist_ok=True)

__all__ = [
    "BlueLMConfig",
    "BlueLMConfigError",
    "BlueLMForCausalLM",
    "BlueLMModel",
    "BlueLMPreTrainedModel",
    "BlueLMTokenizer",
    "BlueLMTokenizerError",
    "CheckpointVocabError",
    "bluelm_vocab_rows_from_checkpoint",
]
