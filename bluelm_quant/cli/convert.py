"""Rewrite a 4-bit checkpoint into the standard GPTQ layout vLLM, GPTQModel and transformers load.

    bluelm-convert --model /path/to/BlueLM-7B-Chat-4bits --out out/BlueLM-7B-Chat-4bits-gptq

Converts the legacy BlueLM-7B-Chat-4bits layout, v2 zeros and static act-order checkpoints
(details: bluelm_quant/convert.py, docs/CHECKPOINTS.md). A checkpoint that cannot be rewritten
without changing the model (dynamic act-order, partial groups) is refused with the reason and
nothing is written. The source is never modified; the output appears only when complete.
"""
from __future__ import annotations

import argparse
import sys

from . import add_debug_flag, configure_logging, run_tool


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the 4-bit checkpoint directory to convert (read only)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default=None,
                   help="dtype of the unquantized tensors and config.json (default: the source's if 16-bit, else bfloat16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is a quantized checkpoint or empty (never the source)")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_tool(convert_command, parser().parse_args(argv))


def convert_command(args: argparse.Namespace) -> int:
    from ..convert import convert

    configure_logging()
    report = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
