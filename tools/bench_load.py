#!/usr/bin/env python
"""Load time and peak memory of `load_quantized`, each run in a fresh process.

For every variant (e.g. `fp16`, `fp16+embed_cpu`, `bf16+head8`) a child process imports
torch, loads the checkpoint, and reports: load seconds; peak RSS (ru_maxrss) after the
load, after one token of forward pass (a CPU model's weights are memory-mapped views of
the checkpoint, resident once touched), and of the imports alone; bytes of model tensors per device; bytes the kernel layout adds (the
act-order row permutations); on CUDA, torch.cuda.max_memory_allocated after the
load and after generating to --context tokens. Medians over --repeat runs; a table on
stdout and everything in --json.

    python tools/bench_load.py --model /tmp/bluelm7b-synth-4bit --device cpu --variants fp16
    python tools/bench_load.py --model DIR --device cuda --variants fp16,fp16+embed_cpu --context 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


GIB = 1024**3
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "auto": None}


def parse_variant(variant: str) -> dict:
    """'fp16+embed_cpu+head8' -> load_quantized options."""
    parts = variant.split("+")
    if parts[0] not in DTYPE_NAMES:
        raise SystemExit(f"variant {variant!r}: start with one of {sorted(DTYPE_NAMES)}")
    opts = {"dtype": DTYPE_NAMES[parts[0]], "embed_on_cpu": False, "lm_head_bits": 16}
    for p in parts[1:]:
        if p == "embed_cpu":
            opts["embed_on_cpu"] = True
        elif p == "head8":
            opts["lm_head_bits"] = 8
        else:
            raise SystemExit(f"variant {variant!r}: unknown option {p!r} (known: embed_cpu, head8)")
    return opts


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from bluelm_quant.loading import load_quantized
    from bluelm_quant.nn import QuantLinear
    from bluelm_quant.placement import tensor_bytes

    opts = parse_variant(args.variant)
    dtype = getattr(torch, opts.pop("dtype")) if DTYPE_NAMES[args.variant.split("+")[0]] else None
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    model = load_quantized(args.model, device=args.device, dtype=dtype, **opts)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    kernel = sum(m.kernel_perm.numel() * m.kernel_perm.element_size()
                 for m in model.modules() if isinstance(m, QuantLinear) and m.kernel_perm is not None)
    out = {
        "variant": args.variant, "device": args.device, "dtype": str(model.dtype), "load_s": load_s,
        "rss_imports": rss_imports, "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after": rss_now(), "cpu_tensor_bytes": tensor_bytes(model, "cpu"), "kernel_repack_bytes": kernel,
    }
    with torch.inference_mode():  # one token through the model touches every mapped weight page
        model(torch.zeros(1, 1, dtype=torch.long, device="cpu" if opts["embed_on_cpu"] else args.device))
    out["rss_peak_forward"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        out["cuda_tensor_bytes"] = tensor_bytes(model, "cuda")
        out["cuda_max_allocated_load"] = torch.cuda.max_memory_allocated()
    if args.context:
        from bluelm_quant.generate import Generator

        torch.cuda.reset_peak_memory_stats() if cuda else None
        gen = Generator(model, max_len=args.context)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.context - args.new_tokens),
                               generator=torch.Generator().manual_seed(0))
        stats = gen.generate(prompt, args.new_tokens)
        out.update(context=args.context, prefill_s=stats.prefill_s, decode_tok_s=stats.decode_tokens_per_s,
                   rss_peak_generate=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if cuda:
            out["cuda_max_allocated_generate"] = torch.cuda.max_memory_allocated()
    return out


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--device", args.device,
           "--variant", variant, "--threads", str(args.threads), "--context", str(args.context),
           "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{variant}: the child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Medians of the numeric fields over repeated runs of one variant."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs"] = len(runs)
    return out


def table(rows: list[dict], ckpt: int) -> str:
    cols = [("variant", lambda r: r["variant"]), ("load s", lambda r: f"{r['load_s']:.1f}"),
            ("peak RSS GiB", lambda r: f"{r['rss_peak'] / GIB:.2f}"),
            ("RSS - imports GiB", lambda r: f"{(r['rss_peak'] - r['rss_imports']) / GIB:.2f}"),
            ("peak RSS +1 token GiB", lambda r: f"{r['rss_peak_forward'] / GIB:.2f}"),
            ("CPU tensors GiB", lambda r: f"{r['cpu_tensor_bytes'] / GIB:.2f}"),
            ("kernel layout GiB", lambda r: f"{r['kernel_repack_bytes'] / GIB:.2f}")]
    if "cuda_tensor_bytes" in rows[0]:
        cols += [("GPU tensors GiB", lambda r: f"{r['cuda_tensor_bytes'] / GIB:.2f}"),
                 ("max alloc load GiB", lambda r: f"{r['cuda_max_allocated_load'] / GIB:.2f}")]
        if "cuda_max_allocated_generate" in rows[0]:
            cols.append((f"max alloc @ctx GiB", lambda r: f"{r['cuda_max_allocated_generate'] / GIB:.2f}"))
    lines = [f"checkpoint on disk: {ckpt / GIB:.2f} GiB ({ckpt / 1e9:.2f} GB)", " | ".join(c for c, _ in cols)]
    lines += [" | ".join(f(r) for _, f in cols) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="4-bit checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="fp16", help="comma list of dtype[+embed_cpu][+head8], dtype in fp16/bf16/fp32/auto")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads in the child")
    p.add_argument("--context", type=int, default=0, help="also generate to this many tokens of context (0: load only)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps at the end of --context")
    p.add_argument("--json", help="write results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    ckpt = checkpoint_bytes(args.model)
    rows = []
    for variant in args.variants.split(","):
        runs = [run_child(args, variant) for _ in range(args.repeat)]
        rows.append(summarize(runs))
    report = {"model": args.model, "checkpoint_bytes": ckpt, "loadavg": os.getloadavg(), "results": rows}
    print(table(rows, ckpt))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
