"""Command-line tools: `pip install` puts them on PATH as console scripts.

    bluelm-quantize   quantize.py   full-precision model -> 4-bit GPTQ checkpoint (demo with no arguments)
    bluelm-chat       chat.py       multi-turn chat in the terminal
    bluelm-eval-ppl   eval_ppl.py   perplexity of a model directory on a text
    bluelm-finetune   finetune.py   LoRA fine-tuning of a 4-bit model (demo with no arguments)
    bluelm-merge-adapter  merge_adapter.py  base + LoRA adapter -> one full-precision (or re-quantized) model

`python tools/<name>.py` runs the same code. Every tool maps its flags onto a library call;
an expected failure (bad input, a missing file, a device that cannot run the model) is one
line on stderr and exit status 2, and a traceback only with --debug.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_ERROR = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "bad input or environment", as opposed to a bug."""
    from ..chat import ChatError
    from ..config import QuantConfigError
    from ..data import CalibrationDataError
    from ..finetune import FinetuneError
    from ..gptq import GPTQError
    from ..layer_job import NonFiniteActivationError
    from ..lora import LoRAError
    from ..models import UnsupportedModelError
    from ..models.bluelm import BlueLMConfigError, BlueLMTokenizerError
    from ..placement import DeviceError, DeviceMemoryError
    from ..sft_data import FinetuneDataError
    from ..shards import CheckpointError
    from ..smollm2 import SmolLM2Error
    from ..workdir import ResumeError

    return (QuantConfigError, CheckpointError, ResumeError, FileExistsError, CalibrationDataError, UnsupportedModelError,
            NonFiniteActivationError, GPTQError, SmolLM2Error, DeviceError, DeviceMemoryError, ChatError,
            BlueLMConfigError, BlueLMTokenizerError, FinetuneError, FinetuneDataError, LoRAError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def run_tool(tool: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run `tool(args)`; an expected error becomes one line on stderr and exit status 2."""
    try:
        return tool(args)
    except expected_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


__all__ = ["EXIT_ERROR", "add_debug_flag", "expected_errors", "run_tool"]
