#!/usr/bin/env python
"""Perplexity of full precision vs RTN vs GPTQ variants, in-domain and out-of-domain.

For each bit width and group size it quantizes the model with round-to-nearest and with
each named GPTQ variant (VARIANTS: act-order kind, clip search, damping, calibration mix
and size), and reports perplexity in English and Chinese on the evaluation domains
(bluelm_quant.eval_data.EVAL_SETS):

  in   held-out chapters of the Debian Reference, the document the default
       calibration text is cut from;
  out  other documents no calibration mix uses: the Debian Administrator's Handbook,
       GNOME Help and the story text of The Battle for Wesnoth's campaigns
       (texts/SOURCES.md), windows split evenly between them (the JSON has each
       file's perplexity under "sets").

plus how much of the fp->RTN gap (same bits and grid) each row closes, and how long the
quantization took. A quantized model is scored with its weights dequantized into float32
Linears: the very weights of the checkpoint, at the speed of the full-precision model.
Prints a table, writes JSON. Default model: SmolLM2-135M-Instruct (judge it at g128, g64 and
per-channel: its weights were published on a 32-wide grid, so g32 looks artificially
lossless). Checkpoints made elsewhere (tools/quantize.py with other settings) can be added
as rows with --checkpoint.

    python tools/compare_quality.py --groups 128 64 --variants static dynamic
    python tools/compare_quality.py --bits 3 --groups 128 64 --variants default
    python tools/compare_quality.py --groups 128 --rtn-only --checkpoint /tmp/x
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time

import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.data import CALIB_MIXES, LANGS, calibration_mix
from bluelm_quant.eval_data import DOMAINS, check_eval_overlap, eval_windows
from bluelm_quant.evaluate import window_nll
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.modeldir import ModelDir
from bluelm_quant.nn import QuantLinear, replace_linear, set_module
from bluelm_quant.pipeline import Calibration, RunOptions, quantize

# Named GPTQ variants: QuantConfig fields, and calibration ("mix", "nsamples"), each over
# tools/quantize.py's defaults (static act-order, Hessian-weighted clip search): "static" and
# "dynamic" are the plain min/max grid, the others the default with one change.
VARIANTS = {
    "default": {},  # QuantConfig's defaults as tools/quantize.py uses them
    "no-act-order": {"desc_act": False},
    "static": {"desc_act": True, "static_groups": True, "mse_clip": False},
    "dynamic": {"desc_act": True, "static_groups": False, "mse_clip": False},
    "static+mse": {"desc_act": True, "static_groups": True, "mse_clip": True, "clip_weights": "uniform"},
    "static+hmse": {"desc_act": True, "static_groups": True, "mse_clip": True, "clip_weights": "hessian"},
    "static+damp0.05": {"desc_act": True, "static_groups": True, "damp_percent": 0.05},
    "static+damp0.1": {"desc_act": True, "static_groups": True, "damp_percent": 0.1},
    "static+asym": {"desc_act": True, "static_groups": True, "sym": False},
    "static+docs": {"desc_act": True, "static_groups": True, "mix": "docs"},
    "static+diverse": {"desc_act": True, "static_groups": True, "mix": "diverse"},
    "static+256": {"desc_act": True, "static_groups": True, "nsamples": 256},
}
CALIB_KEYS = ("mix", "nsamples")


def columns(domains) -> list[tuple[str, str]]:
    return [(d, lang) for d in domains for lang in LANGS]


def evaluate(model, windows: dict) -> dict:
    """{"in_en": ppl, ...} over all windows of each column, and per evaluation file."""
    out, per_set = {}, {}
    for (domain, lang), sets in windows.items():
        total, count = 0.0, 0
        for name, w in sets.items():
            nll, n = window_nll(model, w, progress=False)
            per_set[name] = math.exp(nll / n)
            total, count = total + nll, count + n
        out[f"{domain}_{lang}"] = math.exp(total / count)
    return {**out, "sets": per_set}


def dequantized(path: str):
    """The checkpoint's model with every QuantLinear replaced by a float32 nn.Linear of its weights."""
    model, _ = load_model_and_tokenizer(path, dtype=torch.float32)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(model, name, lin.requires_grad_(False))
    return model.eval()


def variant_config(name: str, bits: int, group_size: int) -> tuple[QuantConfig, dict]:
    fields = {k: v for k, v in VARIANTS[name].items() if k not in CALIB_KEYS}
    calib = {k: v for k, v in VARIANTS[name].items() if k in CALIB_KEYS}
    return QuantConfig(bits=bits, group_size=group_size, **{**_quantize_defaults(), **fields}), calib


def _quantize_defaults() -> dict:
    """What tools/quantize.py uses when given no quantization flags."""
    from bluelm_quant.cli.quantize import parser

    args = parser().parse_args([])
    return {"desc_act": args.act_order != "off", "static_groups": args.act_order == "static", "sym": args.sym,
            "mse_clip": args.clip != "off", "clip_weights": "hessian" if args.clip == "hessian" else "uniform",
            "damp_percent": args.damp}


def run_variant(args, name: str, bits: int, gs: int, windows: dict) -> dict:
    config, calib = variant_config(name, bits, gs)
    sources = calibration_mix(calib.get("mix", args.calib_mix))
    nsamples = calib.get("nsamples", args.nsamples)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q")
        start = time.perf_counter()
        quantize(args.model, out, config, Calibration(sources, nsamples, args.seqlen), RunOptions(progress=False))
        seconds = time.perf_counter() - start
        scores = evaluate(dequantized(out), windows)
    return {"method": f"gptq:{name}", "bits": bits, "group_size": gs, "seconds": round(seconds, 1),
            "config": config.to_dict(), "calib_mix": calib.get("mix", args.calib_mix), "nsamples": nsamples, **scores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="full-precision HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="bit widths to compare (default 4)")
    p.add_argument("--groups", type=int, nargs="+", default=[128, -1], help="group sizes to compare (-1 = per-channel)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default"],
                   help="GPTQ variants, each a row per bit width and group size (default: default)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (a variant may say otherwise)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--calib-mix", choices=sorted(CALIB_MIXES), default="default",
                   help="bundled calibration mix (a variant may say otherwise)")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS),
                   help="evaluation domains: in (held-out chapters of the calibration document), "
                        "out (other documents); default both")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows per language and domain (default 16)")
    p.add_argument("--rtn-only", action="store_true", help="only the fp32 and RTN rows (minutes, not hours on a CPU)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="also evaluate this GPTQ checkpoint directory (repeatable)")
    p.add_argument("--json", default="compare_quality.json", help="where the results go (default compare_quality.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from bluelm_quant.smollm2 import ensure_smollm2

        args.model = str(ensure_smollm2())
    grids = {(q.bits, q.group_size) for q in (ModelDir(c).require_quant() for c in args.checkpoint)}
    grids |= {(b, g) for b in args.bits for g in args.groups}

    fp, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    windows = {(d, lang): eval_windows(tokenizer, lang, d, args.seqlen, args.eval_windows)
               for d, lang in columns(args.domains)}
    mixes = {args.calib_mix} | {VARIANTS[v].get("mix", args.calib_mix) for v in args.variants}
    for mix in sorted(mixes):  # calibration text that also sits in an evaluation set would flatter GPTQ: say so
        check_eval_overlap(tokenizer, {n: w for sets in windows.values() for n, w in sets.items()}, calibration_mix(mix))
    rows = [{"method": "fp32", "bits": None, "group_size": None, **evaluate(fp, windows)}]
    print(f"fp32: {rows[0]}", flush=True)
    del fp
    for bits, gs in sorted(grids, key=lambda g: (-g[0], -g[1] if g[1] > 0 else -10**9)):
        model, _ = load_model_and_tokenizer(args.model, dtype=torch.float32)
        replace_linear(model, QuantConfig(bits=bits, group_size=gs), quantize=True)
        rows.append({"method": "rtn", "bits": bits, "group_size": gs, **evaluate(model, windows)})
        print(f"rtn {bits}-bit g{gs}: {rows[-1]}", flush=True)
        del model
        if args.rtn_only or bits not in args.bits or gs not in args.groups:
            continue
        for name in args.variants:
            rows.append(run_variant(args, name, bits, gs, windows))
            print(f"{rows[-1]['method']} {bits}-bit g{gs}: {rows[-1]}", flush=True)
    for path in args.checkpoint:
        q = ModelDir(path).require_quant()
        rows.append({"method": f"ckpt:{os.path.basename(os.path.normpath(path))}", "bits": q.bits,
                     "group_size": q.group_size, **evaluate(dequantized(path), windows)})
        print(f"checkpoint {path}: {rows[-1]}", flush=True)
    print_table(rows, args.domains)
    print_sets_table(rows)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "calib_mix": args.calib_mix,
                   "eval_windows": args.eval_windows, "domains": args.domains, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


def print_table(rows, domains) -> None:
    """One ppl and one gap-closed column per (domain, language): "gap" is the share of
    the fp32->RTN perplexity gap (same bits and grid) that the row closes."""
    fp = rows[0]
    rtn = {(r["bits"], r["group_size"]): r for r in rows if r["method"] == "rtn"}
    cols = columns(domains)
    print(f"\n{'method':<22}{'bits':>5}{'group':>6}"
          + "".join(f"{'ppl ' + d + '/' + lang:>11}{'gap':>6}" for d, lang in cols) + f"{'time s':>8}")
    for r in rows:
        gs = "" if r["group_size"] is None else ("pc" if r["group_size"] == -1 else str(r["group_size"]))
        base_row = rtn.get((r["bits"], r["group_size"]))
        cells = ""
        for d, lang in cols:
            key, closed = f"{d}_{lang}", ""
            if r["method"] not in ("fp32", "rtn") and base_row is not None:
                closed = _gap_closed(fp[key], base_row[key], r[key])
            cells += f"{r[key]:>11.3f}{closed:>6}"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        bits = "" if r["bits"] is None else str(r["bits"])
        print(f"{r['method'][:22]:<22}{bits:>5}{gs:>6}{cells}{seconds:>8}")


if __name__ == "__main__":
    sys.exit(main())


def _gap_closed(fp: float, rtn: float, value: float) -> str:
    return f"{100 * (rtn - value) / (rtn - fp):.0f}%" if rtn > fp else "n/a"


def print_sets_table(rows) -> None:
    """Perplexity per evaluation file (one line each), every row a column; quantized rows
    other than RTN also get the share of that file's fp32->RTN gap (same grid) they close."""
    fp = rows[0]
    rtn = {(r["bits"], r["group_size"]): r for r in rows if r["method"] == "rtn"}
    header = f"\n{'evaluation file':<22}"
    for r in rows:
        name = r["method"] if r["group_size"] is None else f"{r['method']} {r['bits']}b g{r['group_size']}"
        header += f"{name[:17]:>18}" + ("" if r["method"] in ("fp32", "rtn") else f"{'gap':>6}")
    print(header)
    for name in fp["sets"]:
        line = f"{name:<22}"
        for r in rows:
            line += f"{r['sets'][name]:>18.3f}"
            if r["method"] not in ("fp32", "rtn"):
                base = rtn.get((r["bits"], r["group_size"]))
                line += f"{_gap_closed(fp['sets'][name], base['sets'][name], r['sets'][name]) if base else '':>6}"
        print(line)
