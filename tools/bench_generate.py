#!/usr/bin/env python
"""End-to-end generation speed: the 4-bit model against its full-precision original.

Both models run the same loop (bluelm_quant.generate.Generator: static KV cache, eager
prefill, one decode step per token, the step compiled with --compile). For each batch
size: prefill tokens/s, decode tokens/s, time to first token (the prefill plus the first
token), peak memory (CUDA: max_memory_allocated; CPU: peak RSS of the process). Each
model runs in its own process so peak RSS belongs to it alone. Medians over --repeat
timed runs after one warm-up run. A table on stdout, everything in --json.

CPU (defaults: SmolLM2-135M, batch 1 and 4, fp32):
    python tools/bench_generate.py --quant /tmp/smol_q16 --fp /tmp/blq_cache/smollm2-135m-instruct
GPU (fp16; --fp dequant builds the fp16 counterpart from the 4-bit weights in memory):
    python tools/bench_generate.py --quant DIR --fp dequant --device cuda --batch 1,4,16 \\
        --prompt 512 --new 128 --compile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys


GIB = 1024**3


def load(kind: str, args):
    """('quant', dir) -> load_quantized; ('fp', dir) -> from_pretrained; ('fp', 'dequant') ->
    the 4-bit model with every QuantLinear replaced by an nn.Linear of its dequantized weight."""
    import torch

    import bluelm_quant  # noqa: F401  (BlueLM in the Auto classes)
    from bluelm_quant.loading import load_quantized

    dtype = getattr(torch, args.dtype)
    if kind == "quant" or args.fp == "dequant":
        model = load_quantized(args.quant, device=args.device, dtype=dtype, embed_on_cpu=args.embed_on_cpu,
                               lm_head_bits=args.lm_head_bits)
        if kind == "fp":
            dequantize_in_place(model)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.fp, dtype=dtype, device_map=args.device).eval()


def dequantize_in_place(model) -> None:
    import torch
    from torch import nn

    from bluelm_quant.nn import QuantLinear, set_module

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.qweight.device,
                            dtype=m.scales.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(m.scales.dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(model, name, lin.requires_grad_(False))
            del m


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from bluelm_quant.generate import Generator

    cuda = args.device.startswith("cuda")
    model = load(args.kind, args)
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        gen = Generator(model, max_len=args.prompt + args.new, compile=args.compile)
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gen.generate(prompt, args.new)  # warm-up (and compilation)
        runs = [gen.generate(prompt, args.new) for _ in range(args.repeat)]
        row = {
            "model": args.kind, "batch": batch, "prompt": args.prompt, "new": args.new,
            "prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in runs),
            "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "ttft_s": statistics.median(r.prefill_s for r in runs),
            "tokens_head": runs[-1].tokens[0, args.prompt:args.prompt + 8].tolist(),
        }
        row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.append(row)
        del gen
    return {"kind": args.kind, "rows": results}


def run_child(args, kind: str) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind]
    for k in ("quant", "fp", "device", "dtype", "batch", "prompt", "new", "repeat", "threads", "lm_head_bits"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--compile"] if args.compile else []
    cmd += ["--embed-on-cpu"] if args.embed_on_cpu else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} model: the child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


def table(rows: list[dict], device: str) -> str:
    mem = "peak alloc GiB" if device.startswith("cuda") else "peak RSS GiB"
    head = f"model | batch | prompt | new | prefill tok/s | decode tok/s | TTFT ms | {mem}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['model']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.2f} | {r['ttft_s'] * 1000:.0f} | {r['peak_bytes'] / GIB:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", default="/tmp/smol_q16", help="4-bit checkpoint directory")
    p.add_argument("--fp", default="/tmp/blq_cache/smollm2-135m-instruct",
                   help="full-precision model directory, 'dequant' (from the 4-bit weights) or 'none'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="compute dtype (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--batch", default=None, help="comma list (default 1,4 on the CPU, 1,4,16 on CUDA)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64 CPU, 512 CUDA)")
    p.add_argument("--new", type=int, default=None, help="generated tokens (default 32 CPU, 128 CUDA)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
    p.add_argument("--embed-on-cpu", action="store_true")
    p.add_argument("--lm-head-bits", type=int, default=16)
    p.add_argument("--json", help="write results here")
    p.add_argument("--child", choices=["quant", "fp"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.batch = args.batch or ("1,4,16" if cuda else "1,4")
    args.prompt = args.prompt or (512 if cuda else 64)
    args.new = args.new or (128 if cuda else 32)
    if args.child:
        args.kind = args.child
        print(json.dumps(child(args)))
        return
    rows = run_child(args, "quant")
    if args.fp != "none":
        rows += run_child(args, "fp")
    print(table(rows, args.device))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "loadavg": os.getloadavg(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
