"""Merge a LoRA adapter into its base model: one full-precision Hugging Face checkpoint.

    bluelm-merge-adapter --model out/model-gptq-4bit-g128 --adapter out/lora --out out/merged
    bluelm-merge-adapter --model ... --adapter ... --out out/merged --requantize

The base may be 4-bit (each adapted layer becomes its dequantized weight plus the adapter's
update) or full precision. --requantize then runs bluelm-quant's GPTQ on the merged model
with the base checkpoint's settings (bits, group size, act-order, ...) and the bundled
calibration text, giving a 4-bit checkpoint that needs no adapter at run time.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import add_debug_flag, run_tool

DTYPES = ("float32", "float16", "bfloat16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-merge-adapter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on (4-bit or full precision)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", help="merged full-precision directory (default out/<model name>-merged)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the merged weights (default: the base config's torch_dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.add_argument("--requantize", action="store_true", help="also quantize the merged model with GPTQ (the base's settings)")
    p.add_argument("--requantized-out", help="where the re-quantized model goes (default <out>-gptq)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows for --requantize (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window for --requantize (default 512)")
    p.add_argument("--device", default=None, help="where --requantize runs each layer (default: cuda if available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_tool(merge_command, parser().parse_args(argv))


def merge_command(args: argparse.Namespace) -> int:
    import torch

    from ..merge import merge_adapter, requantize

    out = args.out or os.path.join("out", os.path.basename(os.path.normpath(args.model)) + "-merged")
    merge_adapter(args.model, args.adapter, out, dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.overwrite)
    print(f"merged model: {out}")
    if args.requantize:
        from ..pipeline import Calibration, RunOptions

        target = args.requantized_out or out.rstrip("/") + "-gptq"
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report = requantize(out, target, args.model, Calibration(nsamples=args.nsamples, seqlen=args.seqlen),
                            RunOptions(device=device, overwrite=args.overwrite, progress=not args.quiet))
        print(f"re-quantized model: {target} ({report['summary']['layers']} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
