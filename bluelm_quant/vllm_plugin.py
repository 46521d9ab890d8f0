"""BlueLM for vLLM: the `vllm.general_plugins` entry point (see setup.py).

vLLM calls `register()` in every process it starts (the API server or `LLM`, the engine core,
each tensor-parallel worker), so it must be cheap and idempotent. It registers:

- BlueLMConfig with transformers' AutoConfig (and the BlueLM tokenizer with AutoTokenizer), so
  vLLM reads a BlueLM config.json without trust_remote_code;
- the architecture "BlueLMForCausalLM" with vLLM's ModelRegistry, as a lazy "module:Class"
  string: the model module (bluelm_quant.vllm_bluelm) is imported only where a model is built;
- how vLLM sizes a BlueLM model (bluelm_quant.vllm_config): vocabulary rows from the checkpoint,
  the context length, and one-line errors for configs the vLLM model cannot serve.

Nothing here needs the compiled quant_cuda extension: vLLM runs the GPTQ layers with its own
kernels. Importing this module does not import vLLM; `register()` does.
"""
from __future__ import annotations

ARCHITECTURE = "BlueLMForCausalLM"
MODEL_CLASS = "bluelm_quant.vllm_bluelm:BlueLMForCausalLM"


def register() -> None:
    """Make BlueLM servable by vLLM in this process (safe to call any number of times)."""
    from vllm import ModelRegistry

    # Registers BlueLMConfig / BlueLMTokenizer with the transformers Auto classes (exist_ok=True).
    import bluelm_quant.models.bluelm  # noqa: F401

    from .vllm_config import register_arch_config

    register_arch_config()
    # vLLM logs (at debug level) and replaces an existing entry, so a second call is harmless.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
