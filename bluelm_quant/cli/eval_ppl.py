"""Perplexity of a model directory (full precision or 4-bit GPTQ) on a text.

    bluelm-eval-ppl --model DIR --text en            # bundled held-out English
    bluelm-eval-ppl --model DIR --text zh --seqlen 512 --max-windows 20
    bluelm-eval-ppl --model smollm2 --text FILE.txt  # the built-in SmolLM2-135M

A 4-bit directory (quantize_config.json, quantization_config in config.json, or the legacy
BlueLM-7B-Chat-4bits tensors) is loaded with bluelm_quant.load_quantized; anything else with
AutoModelForCausalLM.from_pretrained. bluelm_quant/evaluate.py defines the measure.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import add_debug_flag, configure_logging, positive_int, run_tool

DTYPES = ("float32", "float16", "bfloat16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-eval-ppl", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory, or 'smollm2' for the built-in SmolLM2-135M-Instruct")
    p.add_argument("--adapter", help="a LoRA adapter directory trained on --model: score base + adapter (needs peft)")
    p.add_argument("--text", default="en", help="a UTF-8 text file, or 'en' / 'zh' for the bundled held-out texts (default en)")
    p.add_argument("--seqlen", type=positive_int, default=512,
                   help="tokens per window, at least 2; the first of each is context only (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="score only the first N windows (default: every whole window of the text, slow on a CPU)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--lm-head-bits", type=int, choices=(16, 8, 4), default=16,
                   help="4-bit checkpoints: score with the lm_head quantized at load, 8 (int8) or 4 (RTN g32), "
                        "as bluelm-chat --lm-head-bits runs it (default 16: as stored)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code (a family bluelm-quant does not implement)")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.seqlen < 2:
        p.error(f"--seqlen {args.seqlen}: a window needs at least 2 tokens to score one")
    if args.text not in ("en", "zh"):
        text = Path(args.text)
        if text.is_dir():
            p.error(f"--text {args.text} is a directory; give one UTF-8 text file (or 'en' / 'zh')")
        if not text.is_file():
            p.error(f"--text {args.text}: no such file (or use 'en' / 'zh')")
    if args.lm_head_bits != 16:
        from ..hf import is_quantized_dir

        if args.trust_remote_code or args.model == "smollm2" or not is_quantized_dir(args.model):
            p.error(f"--lm-head-bits {args.lm_head_bits}: {args.model} is not a 4-bit checkpoint (a quantized lm_head "
                    "comes with one only)")
    return run_tool(eval_command, args)


def _load(model_dir: str, device: str, dtype, trust_remote_code: bool, lm_head_bits: int = 16):
    if trust_remote_code:  # a model family bluelm-quant does not implement itself
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..shards import CheckpointError

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=True).to(device)
        except (OSError, ValueError) as e:  # transformers' errors for missing or unreadable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load {model_dir} with its own code: {first}") from e
        return model.eval(), tokenizer
    from ..hf import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, device=device, dtype=dtype, lm_head_bits=lm_head_bits)


def _read_text(path: str) -> str:
    from ..records import CalibrationDataError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(
            f"--text {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); give a UTF-8 text file"
        ) from None


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from ..data import LANGS
    from ..eval_data import heldout_text
    from ..evaluate import perplexity

    configure_logging()
    text = heldout_text(args.text) if args.text in LANGS else _read_text(args.text)
    if args.model == "smollm2":
        from ..smollm2 import ensure_smollm2

        model_dir = str(ensure_smollm2())
    else:
        model_dir = args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    start = time.time()
    model, tokenizer = _load(model_dir, device, dtype, args.trust_remote_code, args.lm_head_bits)
    if args.adapter:
        from ..lora import load_adapter

        model = load_adapter(model, args.adapter)
    loaded = time.time()
    ppl = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size)
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    adapter += f", lm_head {args.lm_head_bits}-bit" if args.lm_head_bits != 16 else ""
    print(f"model {model_dir}{adapter} text {args.text} seqlen {args.seqlen} dtype {dtype} device {device}: "
          f"load {loaded - start:.1f}s, eval {time.time() - loaded:.1f}s", file=sys.stderr)
    print(f"perplexity {ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
