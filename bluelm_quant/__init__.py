"""bluelm-quant: 4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models."""
from .config import QuantConfig, QuantConfigError
from .nn import QuantLinear, replace_linear
from . import models  # noqa: F401  (registers BlueLM with transformers)

__all__ = ["QuantConfig", "QuantConfigError", "QuantLinear", "replace_linear"]
__version__ = "0.1.0"
