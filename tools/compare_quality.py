#!/usr/bin/env python
"""Perplexity of full precision vs RTN vs GPTQ, in-domain and out-of-domain.

For each grid (group size x act-order) it quantizes the model with round-to-nearest
and with GPTQ (same grid, a named bundled calibration mix), and reports perplexity in
English and Chinese on two evaluation domains (bluelm_quant.data.EVAL_SETS):

  in   held-out chapters of the Debian Reference, the document the default
       calibration text is cut from;
  out  other documents no calibration mix uses: the Debian Administrator's Handbook,
       GNOME Help and the story text of The Battle for Wesnoth's campaigns
       (texts/SOURCES.md), windows split evenly between them (the JSON has each
       file's perplexity under "sets").

plus how much of the fp->RTN gap GPTQ closes in each column. Prints a table, writes
JSON. Default model: SmolLM2-135M-Instruct (judge it at g128 and per-channel: its
weights were published on a 32-wide grid, so g32 looks artificially lossless).
Checkpoints made elsewhere (tools/quantize.py with other settings) can be added as
rows with --checkpoint; their grid's RTN row is the baseline of their gap.

    python tools/compare_quality.py --groups 128 -1 --nsamples 128 --eval-windows 16
    python tools/compare_quality.py --groups 128 --act-order on --domains out
    python tools/compare_quality.py --groups 128 --rtn-only --checkpoint /tmp/x
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time

import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.data import CALIB_MIXES, DOMAINS, LANGS, calibration_mix, check_eval_overlap, eval_windows
from bluelm_quant.evaluate import window_nll
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.nn import replace_linear
from bluelm_quant.pipeline import Calibration, RunOptions, quantize


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


def checkpoint_grid(path: str) -> tuple[int, int, bool]:
    """(bits, group size, act-order) of a GPTQ checkpoint directory."""
    for name in ("quantize_config.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg = cfg.get("quantization_config", cfg)
            if "group_size" in cfg:
                return int(cfg.get("bits", 4)), int(cfg["group_size"]), bool(cfg.get("desc_act", False))
    raise SystemExit(f"--checkpoint {path}: no quantize_config.json or quantization_config; not a GPTQ checkpoint")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="full-precision HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", type=int, nargs="+", default=[128, -1], help="group sizes to compare (-1 = per-channel)")
    p.add_argument("--act-order", choices=["both", "on", "off"], default="both")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-mix", choices=sorted(CALIB_MIXES), default="default",
                   help="bundled calibration mix for the GPTQ rows (bluelm_quant.data.CALIB_MIXES)")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS),
                   help="evaluation domains: in (held-out chapters of the calibration document), "
                        "out (other documents); default both")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows per language and domain")
    p.add_argument("--rtn-only", action="store_true", help="only the fp32 and RTN rows (minutes, not an hour on a CPU)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="also evaluate this GPTQ checkpoint directory (repeatable)")
    p.add_argument("--json", default="compare_quality.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from bluelm_quant.smollm2 import ensure_smollm2

        args.model = str(ensure_smollm2())
    orders = {"both": [False, True], "on": [True], "off": [False]}[args.act_order]
    grids = {checkpoint_grid(c) for c in args.checkpoint}
    if any(bits != args.bits for bits, _, _ in grids):
        raise SystemExit(f"--checkpoint bits {sorted({b for b, _, _ in grids})} differ from --bits {args.bits}")
    groups = list(dict.fromkeys(args.groups + [gs for _, gs, _ in grids]))

    fp, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    windows = {(d, lang): eval_windows(tokenizer, lang, d, args.seqlen, args.eval_windows)
               for d, lang in columns(args.domains)}
    calib = calibration_mix(args.calib_mix)
    # Calibration text that also sits in an evaluation set would flatter GPTQ: say so.
    check_eval_overlap(tokenizer, {n: w for sets in windows.values() for n, w in sets.items()}, calib)

    rows = [{"method": "fp32", "group_size": None, "act_order": None, **evaluate(fp, windows)}]
    print(f"fp32: {rows[0]}", flush=True)
    del fp
    for gs in groups:
        config = QuantConfig(bits=args.bits, group_size=gs, sym=args.sym)
        model, _ = load_model_and_tokenizer(args.model, dtype=torch.float32)
        replace_linear(model, config, quantize=True)
        rows.append({"method": "rtn", "group_size": gs, "act_order": None, **evaluate(model, windows)})
        print(f"rtn g{gs}: {rows[-1]}", flush=True)
        del model
        for act in [] if args.rtn_only or gs not in args.groups else orders:
            config = QuantConfig(bits=args.bits, group_size=gs, sym=args.sym, desc_act=act)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out = os.path.join(tmp, "q")
                quantize(args.model, out, config, Calibration(calib, args.nsamples, args.seqlen), RunOptions(progress=False))
                seconds = time.perf_counter() - start
                model, _ = load_model_and_tokenizer(out, dtype=torch.float32)
                rows.append({"method": "gptq", "group_size": gs, "act_order": act, "seconds": round(seconds, 1),
                             "calib_mix": args.calib_mix, **evaluate(model, windows)})
                del model
            print(f"gptq g{gs} act_order={act}: {rows[-1]}", flush=True)
    for path in args.checkpoint:
        _, gs, act = checkpoint_grid(path)
        model, _ = load_model_and_tokenizer(path, dtype=torch.float32)
        rows.append({"method": os.path.basename(os.path.normpath(path)), "group_size": gs, "act_order": act,
                     "checkpoint": os.path.abspath(path), **evaluate(model, windows)})
        del model
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
    the fp32->RTN perplexity gap (same grid) that the row closes."""
    fp = rows[0]
    rtn = {r["group_size"]: r for r in rows if r["method"] == "rtn"}
    cols = columns(domains)
    print(f"\n{'method':<12}{'group':>6}{'act':>5}"
          + "".join(f"{'ppl ' + d + '/' + lang:>11}{'gap':>6}" for d, lang in cols) + f"{'time s':>8}")
    for r in rows:
        gs = "" if r["group_size"] is None else ("pc" if r["group_size"] == -1 else str(r["group_size"]))
        act = "" if r["act_order"] is None else ("yes" if r["act_order"] else "no")
        cells = ""
        for d, lang in cols:
            key, closed = f"{d}_{lang}", ""
            if r["method"] not in ("fp32", "rtn") and r["group_size"] in rtn:
                closed = _gap_closed(fp[key], rtn[r["group_size"]][key], r[key])
            cells += f"{r[key]:>11.3f}{closed:>6}"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        print(f"{r['method'][:12]:<12}{gs:>6}{act:>5}{cells}{seconds:>8}")


if __name__ == "__main__":
    sys.exit(main())


def _gap_closed(fp: float, rtn: float, value: float) -> str:
    return f"{100 * (rtn - value) / (rtn - fp):.0f}%" if rtn > fp else "n/a"


def print_sets_table(rows) -> None:
    """Perplexity per evaluation file (one line each), every row a column; quantized rows
    other than RTN also get the share of that file's fp32->RTN gap (same grid) they close."""
    fp = rows[0]
    rtn = {r["group_size"]: r for r in rows if r["method"] == "rtn"}
    header = f"\n{'evaluation file':<22}"
    for r in rows:
        name = r["method"] if r["group_size"] is None else f"{r['method']} g{r['group_size']}"
        header += f"{name[:17]:>18}" + ("" if r["method"] in ("fp32", "rtn") else f"{'gap':>6}")
    print(header)
    for name in fp["sets"]:
        line = f"{name:<22}"
        for r in rows:
            line += f"{r['sets'][name]:>18.3f}"
            if r["method"] not in ("fp32", "rtn"):
                base = rtn.get(r["group_size"])
                line += f"{_gap_closed(fp['sets'][name], base['sets'][name], r['sets'][name]) if base else '':>6}"
        print(line)
