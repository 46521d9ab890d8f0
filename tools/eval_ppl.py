"""Perplexity of a model directory (full precision or 4-bit GPTQ) on a text.

    python tools/eval_ppl.py --model DIR --text en            # bundled held-out English
    python tools/eval_ppl.py --model DIR --text zh --seqlen 512 --max-windows 20
    python tools/eval_ppl.py --model smollm2 --text FILE.txt  # the built-in SmolLM2-135M

A directory with quantize_config.json, or with quantization_config in config.json, is
loaded with bluelm_quant.checkpoint.load_quantized; anything else with
AutoModelForCausalLM.from_pretrained. See bluelm_quant/evaluate.py for the definition.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(model_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool):
    if trust_remote_code:  # a model family bluelm-quant does not implement itself
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=True).to(device)
        return model.eval(), tokenizer
    from bluelm_quant.hf import load_model_and_tokenizer  # lazy: keeps --help fast

    return load_model_and_tokenizer(str(model_dir), device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="model directory, or 'smollm2' for the built-in SmolLM2-135M-Instruct")
    ap.add_argument("--text", default="en",
                    help="a UTF-8 text file, or 'en' / 'zh' for the bundled held-out texts")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow the model directory's own Python code (BlueLM's HF release)")
    args = ap.parse_args(argv)

    from bluelm_quant.data import LANGS, heldout_text
    from bluelm_quant.evaluate import perplexity

    if args.text in LANGS:
        text = heldout_text(args.text)
    else:
        path = Path(args.text)
        if not path.is_file():
            ap.error(f"--text {args.text}: no such file (or use 'en' / 'zh')")
        text = path.read_text(encoding="utf-8")
    if args.model == "smollm2":
        from bluelm_quant.smollm2 import ensure_smollm2
        model_dir = ensure_smollm2()
    else:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            ap.error(f"--model {model_dir}: not a model directory (no config.json)")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if args.device.startswith("cuda") else torch.float32)

    start = time.time()
    model, tokenizer = load(model_dir, args.device, dtype, args.trust_remote_code)
    loaded = time.time()
    ppl = perplexity(model, tokenizer, text, seqlen=args.seqlen,
                     max_windows=args.max_windows, batch_size=args.batch_size)
    print(f"model {model_dir} text {args.text} seqlen {args.seqlen} dtype {dtype} "
          f"device {args.device}: load {loaded - start:.1f}s, eval {time.time() - loaded:.1f}s",
          file=sys.stderr)
    print(f"perplexity {ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
