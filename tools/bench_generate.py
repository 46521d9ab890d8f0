#!/usr/bin/env python
"""End-to-end generation speed: the 4-bit model against its full-precision original.

Both models run the same loop (bluelm_quant.generate.Generator: static KV cache, eager
prefill, one decode step per token, the step compiled with --compile). For each batch
size: prefill tokens/s, decode tokens/s, time to first token (the prefill plus the first
token), peak memory (CUDA: max_memory_allocated; CPU: peak RSS of the process). Each
model runs in its own process so peak RSS belongs to it alone. Medians over --repeat
timed runs after one warm-up run. A table on stdout, everything in --json.

On the CPU the 4-bit model's rows also give its bandwidth floor: decode time per token over
the time torch.ops.bluelm_quant.read_probe takes to read the tensors a decode step reads (the
quantized linears' qweight + qzeros + scales and the lm_head as loaded) on the kernels' threads,
read right before and after each timed run (so load hits both alike); medians. "linears only"
scales the floor to the 4-bit linears' bytes, the issue's definition.

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
    from bluelm_quant.cpu_decode import prepare_cpu_decode
    from bluelm_quant.loading import load_quantized

    dtype = getattr(torch, args.dtype)
    if kind == "quant" or args.fp == "dequant":
        model = load_quantized(args.quant, device=args.device, dtype=dtype, embed_on_cpu=args.embed_on_cpu,
                               lm_head_bits=args.lm_head_bits)
        if kind == "fp":
            dequantize_in_place(model)
        elif torch.device(args.device).type == "cpu":  # as the chat CLI runs it (on the CPU, where measured)
            prepare_cpu_decode(model)
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


def decode_tensors(model) -> dict:
    """The tensors a batch-1 decode step reads in full: {'linears': the quantized Linears'
    qweight/qzeros/scales, 'head': the lm_head's as loaded (int8, 4-bit or full precision)}."""
    from bluelm_quant.nn import QuantLinear

    head = model.get_output_embeddings()
    linears = [t for m in model.modules() if isinstance(m, QuantLinear) and m is not head
               for t in (m.qweight, m.qzeros, m.scales)]
    return {"linears": linears, "head": list(head.parameters()) + list(head.buffers())}


def read_seconds(tensors, threads: int) -> float:
    """Seconds for torch.ops.bluelm_quant.read_probe to read every tensor once on `threads` kernel
    threads: the step's weight reads and nothing else (one op call per tensor, ~10 us each, so
    the floor is a few percent slow at most: the ratio errs in the kernels' favour)."""
    import time

    import torch

    from bluelm_quant import ops

    before = ops.kernel_threads_setting()
    ops.set_kernel_threads(threads)
    try:
        t0 = time.perf_counter()
        for t in tensors:
            torch.ops.bluelm_quant.read_probe(t)
        return time.perf_counter() - t0
    finally:
        ops.set_kernel_threads(before)


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from bluelm_quant.generate import Generator

    cuda = args.device.startswith("cuda")
    model = load(args.kind, args)
    # The 4-bit model on the CPU: its bandwidth floor, read right before and after each timed run.
    floor = args.kind == "quant" and not cuda
    tensors = decode_tensors(model) if floor else {}
    weights = tensors.get("linears", []) + tensors.get("head", [])
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        gen = Generator(model, max_len=args.prompt + args.new, compile=args.compile)
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gen.generate(prompt, args.new)  # warm-up (and compilation)
        runs, reads = [], []
        for _ in range(args.repeat):
            before = read_seconds(weights, args.threads) if floor else 0.0
            runs.append(gen.generate(prompt, args.new))
            reads.append((before + read_seconds(weights, args.threads)) / 2 if floor else 0.0)
        row = {
            "model": args.kind, "batch": batch, "prompt": args.prompt, "new": args.new,
            "prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in runs),
            "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "ttft_s": statistics.median(r.prefill_s for r in runs),
            "tokens_head": runs[-1].tokens[0, args.prompt:args.prompt + 8].tolist(),
        }
        if floor:
            nbytes = {k: sum(t.numel() * t.element_size() for t in v) for k, v in tensors.items()}
            row.update(linear_bytes=nbytes["linears"], head_bytes=nbytes["head"],
                       read_gbs=statistics.median((nbytes["linears"] + nbytes["head"]) / s / 1e9 for s in reads),
                       # decode time per token / time to read its weights, per run (same moments)
                       floor_ratio=statistics.median(r.decode_s / (r.new_tokens - 1) / s for r, s in zip(runs, reads)))
            share = nbytes["linears"] / (nbytes["linears"] + nbytes["head"])
            row["floor_ratio_linears"] = row["floor_ratio"] / share  # against the 4-bit linears' bytes alone
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
    floors = [r for r in rows if "floor_ratio" in r]
    if floors:
        lines.append("")
        lines.append("bandwidth floor (4-bit model) | batch | linears GB | lm_head GB | read GB/s | decode time / read time "
                     "(linears + head) | (4-bit linears only)")
        for r in floors:
            lines.append(f"quant | {r['batch']} | {r['linear_bytes'] / 1e9:.3f} | {r['head_bytes'] / 1e9:.3f} | "
                         f"{r['read_gbs']:.1f} | {r['floor_ratio']:.2f}x | {r['floor_ratio_linears']:.2f}x")
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
    p.add_argument("--lm-head-bits", type=int, default=16, choices=(16, 8, 4))
    p.add_argument("--json", help="write results here")
    p.add_argument("--child", choices=["quant", "fp"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    if args.threads < 1:
        p.error(f"--threads {args.threads}: use a positive thread count")
    if args.threads > cpus and not args.child:
        print(f"note: --threads {args.threads} but this process may run on {cpus} CPUs: using {cpus}", file=sys.stderr)
        args.threads = cpus
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
