#!/usr/bin/env python
"""Perplexity of full precision vs RTN vs GPTQ on the bundled held-out texts.

For each grid (group size x act-order) it quantizes the model with round-to-nearest
and with GPTQ (same grid, bundled calibration set), and reports held-out perplexity in
English and Chinese, plus how much of the fp->RTN gap GPTQ closes. Prints a table,
writes JSON. Default model: SmolLM2-135M-Instruct (judge it at g128 and per-channel:
its weights were published on a 32-wide grid, so g32 looks artificially lossless).

    python tools/compare_quality.py --groups 128 -1 --nsamples 128 --eval-windows 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.data import heldout_text
from bluelm_quant.evaluate import perplexity
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.nn import replace_linear
from bluelm_quant.pipeline import Calibration, RunOptions, quantize

LANGS = ("en", "zh")


def evaluate(model, tokenizer, args) -> dict:
    return {
        lang: perplexity(model, tokenizer, heldout_text(lang), seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
        for lang in LANGS
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="full-precision HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", type=int, nargs="+", default=[128, -1], help="group sizes to compare (-1 = per-channel)")
    p.add_argument("--act-order", choices=["both", "on", "off"], default="both")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per language")
    p.add_argument("--rtn-only", action="store_true", help="only the fp32 and RTN rows (minutes, not an hour on a CPU)")
    p.add_argument("--json", default="compare_quality.json")
    args = p.parse_args(argv)
    if args.model is None:
        from bluelm_quant.smollm2 import ensure_smollm2

        args.model = str(ensure_smollm2())
    orders = {"both": [False, True], "on": [True], "off": [False]}[args.act_order]

    fp, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    rows = [{"method": "fp32", "group_size": None, "act_order": None, **evaluate(fp, tokenizer, args)}]
    print(f"fp32: {rows[0]}", flush=True)
    del fp
    for gs in args.groups:
        config = QuantConfig(bits=args.bits, group_size=gs, sym=args.sym)
        model, _ = load_model_and_tokenizer(args.model, dtype=torch.float32)
        replace_linear(model, config, quantize=True)
        rows.append({"method": "rtn", "group_size": gs, "act_order": None, **evaluate(model, tokenizer, args)})
        print(f"rtn g{gs}: {rows[-1]}", flush=True)
        del model
        for act in [] if args.rtn_only else orders:
            config = QuantConfig(bits=args.bits, group_size=gs, sym=args.sym, desc_act=act)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out = os.path.join(tmp, "q")
                quantize(args.model, out, config, Calibration(nsamples=args.nsamples, seqlen=args.seqlen), RunOptions(progress=False))
                seconds = time.perf_counter() - start
                model, _ = load_model_and_tokenizer(out, dtype=torch.float32)
                rows.append({"method": "gptq", "group_size": gs, "act_order": act, "seconds": round(seconds, 1),
                             **evaluate(model, tokenizer, args)})
                del model
            print(f"gptq g{gs} act_order={act}: {rows[-1]}", flush=True)
    print_table(rows)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "eval_windows": args.eval_windows, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


def print_table(rows) -> None:
    fp = rows[0]
    rtn = {r["group_size"]: r for r in rows if r["method"] == "rtn"}
    print(f"\n{'method':<8}{'group':>7}{'act-order':>10}" + "".join(f"{'ppl ' + l:>10}{'gap closed':>12}" for l in LANGS))
    for r in rows:
        gs = "" if r["group_size"] is None else ("pc" if r["group_size"] == -1 else str(r["group_size"]))
        act = "" if r["act_order"] is None else ("yes" if r["act_order"] else "no")
        cells = ""
        for lang in LANGS:
            closed = ""
            if r["method"] == "gptq":
                base = rtn[r["group_size"]][lang] - fp[lang]
                closed = f"{100 * (rtn[r['group_size']][lang] - r[lang]) / base:.0f}%" if base > 0 else "n/a"
            cells += f"{r[lang]:>10.3f}{closed:>12}"
        print(f"{r['method']:<8}{gs:>7}{act:>10}{cells}")


if __name__ == "__main__":
    sys.exit(main())
