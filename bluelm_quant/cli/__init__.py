"""Command-line tools: `pip install` puts them on PATH as console scripts.

    bluelm-quantize   quantize.py   full-precision model -> 4-bit GPTQ checkpoint (demo with no arguments)
    bluelm-chat       chat.py       multi-turn chat in the terminal
    bluelm-eval-ppl   eval_ppl.py   perplexity of a model directory on a text
    bluelm-convert    convert.py    a 4-bit checkpoint -> the standard GPTQ layout vLLM serves
    bluelm-finetune   finetune.py   LoRA fine-tuning of a 4-bit model (demo with no arguments)
    bluelm-merge-adapter  merge_adapter.py  base + LoRA adapter -> one full-precision (or re-quantized) model

`python tools/<name>.py` runs the same code. Every tool maps its flags onto a library call;
an expected failure (bad input, a missing file, a device that cannot run the model, a file
system that refuses a write) is one line on stderr and exit status 2, and a traceback only
with --debug. Flags are checked when parsed (argparse: usage line + error, status 2).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
PACKAGE_LOGGER = "bluelm_quant"


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "bad input or environment", as opposed to a bug."""
    from ..chat import ChatError
    from ..config import QuantConfigError
    from ..evaluate import EvaluationError
    from ..finetune import FinetuneError
    from ..gptq import GPTQError
    from ..layer_job import NonFiniteActivationError
    from ..lock import OutputLockError
    from ..lora import LoRAError
    from ..models import UnsupportedModelError
    from ..models.bluelm import BlueLMConfigError, BlueLMTokenizerError
    from ..outputs import OutputError
    from ..placement import DeviceError, DeviceMemoryError
    from ..records import CalibrationDataError
    from ..sft_data import FinetuneDataError
    from ..shards import CheckpointError
    from ..smollm2 import SmolLM2Error
    from ..workdir import ResumeError

    # OSError last: a file the library did not wrap with advice (permissions, a vanished
    # directory) is still the environment, not a bug.
    return (QuantConfigError, CheckpointError, ResumeError, OutputError, OutputLockError, CalibrationDataError,
            UnsupportedModelError, NonFiniteActivationError, GPTQError, SmolLM2Error, DeviceError, DeviceMemoryError,
            ChatError, BlueLMConfigError, BlueLMTokenizerError, EvaluationError, FinetuneError, FinetuneDataError,
            LoRAError, OSError)


def error_line(e: BaseException) -> str:
    """The one line an expected error prints."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def configure_logging(package_level: int = logging.INFO) -> None:
    """Our own package's messages at `package_level`; other libraries' only from WARNING up
    (matplotlib's font-cache INFO lines and the like are not for the user)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # also when a handler was installed before
    logging.getLogger(PACKAGE_LOGGER).setLevel(package_level)


def run_tool(tool: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run `tool(args)`; an expected error becomes one line on stderr and exit status 2."""
    try:
        return tool(args)
    except expected_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        hint = "; the finished layers are kept: run the same command with --resume to continue" \
            if hasattr(args, "resume") else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- argparse types: a bad number is an argparse error naming the flag ------------------------

def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "add_debug_flag", "configure_logging", "error_line", "expected_errors",
           "fraction", "nonnegative_int", "positive_float", "positive_int", "run_tool"]
