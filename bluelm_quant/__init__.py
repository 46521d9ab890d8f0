"""bluelm-quant: 4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models."""
from . import models  # noqa: F401  (registers BlueLM with the transformers Auto classes)
from .chat import chat
from .checkpoint import load_quantized, save_quantized
from .config import QuantConfig, QuantConfigError
from .nn import QuantLinear, replace_linear
from .pipeline import RunOptions, quantize, quantize_model

__all__ = [
    "QuantConfig", "QuantConfigError", "QuantLinear", "RunOptions", "chat", "load_quantized",
    "quantize", "quantize_model", "replace_linear", "save_quantized",
]
__version__ = "0.1.0"
