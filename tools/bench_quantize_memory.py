#!/usr/bin/env python
"""Peak memory and time of quantizing a synthetic 7B-shaped LLaMA on the CPU.

Writes a random LLaMA checkpoint with LLaMA-7B shapes (32 layers, hidden 4096, FFN 11008,
vocab 32000, bf16, 0.5 GB shards: ~13 GB; never commit it) with
tools/make_synthetic_checkpoint.py, then
quantizes it in a child process with a tiny random calibration set and reports the child's
peak RSS and the time per layer. The pipeline streams one decoder layer at a time, so the
peak should stay far below the checkpoint size.

    python tools/bench_quantize_memory.py --dir /tmp/llama7b-synth            # full size
    python tools/bench_quantize_memory.py --dir /tmp/llama-small --layers 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))

CHILD = """
import torch
from bluelm_quant.config import QuantConfig
from bluelm_quant.pipeline import RunOptions, quantize_model
windows = torch.randint(0, {vocab}, ({nsamples}, {seqlen}), generator=torch.Generator().manual_seed(0))
quantize_model({src!r}, {out!r}, QuantConfig(bits=4, group_size=128, desc_act=True), windows,
               RunOptions(overwrite=True, progress=False))
"""


def write_checkpoint(path: str, args) -> None:
    """A random bf16 LLaMA with these shapes (tools/make_synthetic_checkpoint.py, in a child process)."""
    cmd = [sys.executable, os.path.join(TOOLS, "make_synthetic_checkpoint.py"), "--out", path, "--arch", "llama",
           "--full", "--dtype", "bfloat16", "--max-shard-size", "0.5", "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--vocab", str(args.vocab)]
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the synthetic checkpoint lives (created if missing); outside the repo")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows (random tokens)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    src = os.path.abspath(args.dir)
    if not os.path.exists(os.path.join(src, "config.json")):
        write_checkpoint(src, args)
    src_gb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 1e9
    out = src.rstrip("/") + "-gptq"
    code = CHILD.format(vocab=args.vocab, nsamples=args.nsamples, seqlen=args.seqlen, src=src, out=out)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the checkpoint writer's
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"the quantization child failed with exit status {child.returncode}")
    seconds = time.perf_counter() - start
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: KiB
    with open(os.path.join(out, "quantize_report.json"), encoding="utf-8") as f:
        layers = json.load(f)["layers"]
    out_gb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e9
    per_layer = [s["seconds"] for s in layers]
    result = {
        "layers": len(layers), "source_gb": round(src_gb, 2), "quantized_gb": round(out_gb, 2),
        "peak_rss_gb": round(peak_gb, 2), "total_seconds": round(seconds, 1),
        "seconds_per_layer_mean": round(sum(per_layer) / len(per_layer), 1), "seconds_per_layer_max": round(max(per_layer), 1),
        "calibration": f"{args.nsamples} x {args.seqlen} tokens",
    }
    print(f"\n{'layers':>7}{'source GB':>11}{'4-bit GB':>10}{'peak RSS GB':>13}{'total s':>9}{'s/layer':>9}")
    print(f"{result['layers']:>7}{result['source_gb']:>11.2f}{result['quantized_gb']:>10.2f}{result['peak_rss_gb']:>13.2f}"
          f"{result['total_seconds']:>9.0f}{result['seconds_per_layer_mean']:>9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
