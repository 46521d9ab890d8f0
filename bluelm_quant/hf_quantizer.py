"""An opt-in route for transformers' `from_pretrained` on GPTQ checkpoints, through QuantLinear.

transformers maps `quantization_config.quant_method == "gptq"` to its own GPTQ quantizer
(which needs optimum + gptqmodel), and its `register_quantizer` refuses a name that is
already taken. So `enable()` puts BlueLMQuantHfQuantizer in the "gptq" slot of
transformers' quantizer table and `disable()` puts transformers' own quantizer back;
`with enabled():` limits it to a block. Nothing changes until one of them is called.
"""
from __future__ import annotations

import contextlib
import logging
import os

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizer_gptq import GptqHfQuantizer

from .huge_pages import pack_kernel_tensors
from .modeldir import ModelDir
from .shards import CheckpointError
from .skeleton import finish_quant_linear, swap_quant_linears

log = logging.getLogger(__name__)

SLOT = "gptq"


class BlueLMQuantHfQuantizer(HfQuantizer):
    """Loads a pre-quantized GPTQ checkpoint into QuantLinear layers inside from_pretrained.

    The layout is read from the checkpoint directory itself (ModelDir: quantize_config.json,
    config.json, or the tensor shapes for the legacy layout), exactly as `load_quantized`
    reads it; the transformers-side config only routes the load here.
    """

    # Quantizing a full-precision model goes through tools/quantize.py, not from_pretrained.
    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.model_dir: ModelDir | None = None
        self.quantized: list[str] = []

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError(
                f"bluelm_quant.hf loads a 4-bit model onto one device; got device_map={device_map}. "
                "Pass device_map=None (CPU) or a single device such as device_map='cuda:0'"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise CheckpointError("from_pretrained found no weight files to load the 4-bit layers from")
        self.model_dir = ModelDir(os.path.dirname(checkpoint_files[0]))
        # The skeleton is on the meta device in the requested dtype; scales are cast to it on load.
        self.quantized = swap_quant_linears(model, self.model_dir, model.dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        reader = self.model_dir.reader
        for name in self.quantized:
            finish_quant_linear(model.get_submodule(name), f"{name}.g_idx" in reader, self.model_dir.layout)
        model.quant_config = self.model_dir.quant
        self.model_dir.close()
        pack_kernel_tensors(model)  # on the CPU, as load_quantized does: the kernels' weights on 2 MB pages
        return model

    def is_serializable(self):
        return False  # save with bluelm_quant.save_quantized

    @property
    def is_trainable(self) -> bool:
        return False


def is_enabled() -> bool:
    return AUTO_QUANTIZER_MAPPING.get(SLOT) is BlueLMQuantHfQuantizer


def enable() -> None:
    """Route transformers' GPTQ loading (quant_method "gptq") to bluelm-quant until `disable()`.

    Also lets AutoModelForCausalLM load 4-bit BlueLM directories whose config.json has no
    quantization_config (AutoGPTQ's quantize_config.json, the legacy BlueLM-7B-Chat-4bits).
    Quantizing with `GPTQConfig(dataset=...)` is not available while enabled.
    """
    if not is_enabled():
        AUTO_QUANTIZER_MAPPING[SLOT] = BlueLMQuantHfQuantizer
        log.info("transformers' GPTQ loading now goes through bluelm_quant (bluelm_quant.hf.disable() undoes it)")


def disable() -> None:
    """Give transformers its own GPTQ quantizer back."""
    if is_enabled():
        AUTO_QUANTIZER_MAPPING[SLOT] = GptqHfQuantizer


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


__all__ = ["BlueLMQuantHfQuantizer", "disable", "enable", "enabled", "is_enabled"]
