"""The built-in fine-tuning demo: the bundled 4-bit SmolLM2 and a small bilingual instruction set.

The model is SmolLM2-135M-Instruct (smollm2.py) quantized once by our own pipeline with the
defaults `bluelm-quantize` uses (4-bit, group 128, act-order, the bundled calibration text)
and cached as <cache>/smollm2-135m-instruct-gptq-4bit-g128. The data are
texts/sft_demo_{train,dev}.jsonl: 60 + 12 BELLE-style records, English and Chinese
alternating, written for bluelm-quant (CC0-1.0, texts/SOURCES.md); the dev records ask
other questions in the same style.

The settings fit a few minutes on a 2-core CPU: rank 8 on every Linear layer, 256-token
sequences, 4 examples per step.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .data import TEXTS_DIR
from .smollm2 import cache_root, ensure_smollm2

log = logging.getLogger(__name__)

DEMO_MODEL_DIRNAME = "smollm2-135m-instruct-gptq-4bit-g128"
TRAIN_FILE = TEXTS_DIR / "sft_demo_train.jsonl"
DEV_FILE = TEXTS_DIR / "sft_demo_dev.jsonl"
OUTPUT_DIR = "out/smollm2-lora-demo"
# Flag defaults of the demo (what the user did not set on the command line).
SETTINGS = dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, seq_len=256, batch_size_per_device=4,
                gradient_accumulation_steps=1, max_steps=40, save_steps=20, learning_rate=1e-3, warmup_steps=5)
PROMPTS = ("Why do cats purr?", "为什么要多喝水？")


def demo_model(cache_dir=None, progress: bool = True) -> Path:
    """The cached 4-bit SmolLM2 directory, quantized with our GPTQ on first use."""
    from .config import QuantConfig
    from .modeldir import ModelDir
    from .pipeline import Calibration, RunOptions, quantize

    target = cache_root(cache_dir) / DEMO_MODEL_DIRNAME
    if (target / "quantize_config.json").is_file() and ModelDir(str(target)).is_quantized:
        return target
    source = ensure_smollm2(cache_dir)
    log.warning("quantizing SmolLM2-135M-Instruct to 4 bits once for the demo (a few minutes; cached at %s)", target)
    # quantize() writes the directory atomically: a finished one is complete.
    quantize(str(source), str(target), QuantConfig(), Calibration(), RunOptions(device="cpu", overwrite=True, progress=progress))
    return target


__all__ = ["DEMO_MODEL_DIRNAME", "DEV_FILE", "OUTPUT_DIR", "PROMPTS", "SETTINGS", "TRAIN_FILE", "demo_model"]
