"""bluelm-quant: 4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models."""
from .config import QuantConfig, QuantConfigError
from .nn import QuantLinear, replace_linear

__all__ = ["QuantConfig", "QuantConfigError", "QuantLinear", "replace_linear"]
__version__ = "0.1.0"
