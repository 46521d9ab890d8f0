"""bluelm-quant: 4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models.

Importing the package registers BlueLM with transformers' Auto classes
(`bluelm_quant.auto.register_auto_classes`), so BlueLM directories load without
trust_remote_code. docs/ARCHITECTURE.md maps the modules.
"""
from .auto import register_auto_classes
from .chat import chat
from .config import QuantConfig, QuantConfigError
from .cpu_decode import prepare_cpu_decode
from .fuse import fuse_projections
from .loading import load_quantized
from .modeldir import ModelDir
from .nn import QuantLinear, replace_linear
from .pipeline import Calibration, RunOptions, quantize, quantize_model
from .saving import save_quantized

register_auto_classes()

__all__ = [
    "Calibration", "ModelDir", "QuantConfig", "QuantConfigError", "QuantLinear", "RunOptions", "chat",
    "fuse_projections", "load_quantized", "prepare_cpu_decode", "quantize", "quantize_model", "register_auto_classes",
    "replace_linear", "save_quantized",
]
__version__ = "0.1.0"
