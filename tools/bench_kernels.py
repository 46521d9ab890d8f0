"""Benchmark the 4-bit matmul as users run it (bluelm_quant.ops.gemm) on 7B layer shapes.

CUDA: GPU time per call from CUDA-graph replays of `--calls` calls (so Python overhead is
not measured), median of `--iters` replays after warm-up, rotating through enough weight
copies that L2 never holds the weight. Reported: time, GB/s moved (qweight + qzeros +
scales + x + out) and its share of the measured device-to-device copy bandwidth, TFLOP/s,
speedup over torch fp16/bf16 matmul with the same shapes, and over
torch.ops.aten._weight_int4pack_mm where this torch has it. Both of ops.gemm's paths are
timed (fused kernel, dequantize + cuBLAS) to place CUDA_DEQUANT_MIN_M.
CPU (tools/bench_kernels_cpu.py): GB/s and its share of the read bandwidth measured on the
spot, for each CPU body asked for (--isa), beside ops.gemm, torch fp32/bf16 matmul and torch's
int4 CPU kernel, at 1 and 2 threads; then the int8 lm_head kernel (--heads).

  python tools/bench_kernels.py --device cuda --json bench.json
  python tools/bench_kernels.py --device cpu
  python tools/bench_kernels.py --device cpu --shapes 576x1536 --m 1,8 --threads 1 --heads ""
  python tools/bench_kernels.py --device cpu --shapes 4096x11008,11008x4096 --m 1 --heads "" --huge-pages
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench_kernels_cpu import bench_cpu  # beside this script (tools/ is on sys.path when it runs)
from bluelm_quant import extension, ops

SHAPES = "4096x4096,4096x11008,11008x4096,4096x12288"  # K x N: q/k/v/o, gate/up, down, fused qkv
CUDA_M = "1,2,4,8,16,32,64,128,512,2048"
CPU_SHAPES = "4096x4096,4096x11008,11008x4096"
CPU_M = "1,2,4,8,16"
CPU_HEADS = "49152x576"  # N x K: SmolLM2's lm_head (BlueLM-7B's: 100096x4096)
ROTATE_BYTES = 256 << 20  # > 5x the 50 MB L2 of an H100


def random_layer(k: int, n: int, group_size: int, dtype, device):
    """Random GPTQ tensors (any int32 is a valid set of 8 codes) and ops.prepare's layout."""
    groups = -(-k // group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (groups, n // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(groups, n, device=device) * 0.02 + 0.001).to(dtype)
    g_idx = (torch.arange(k, dtype=torch.int32) // group_size).to(device)
    return ops.prepare(qweight, qzeros, scales, g_idx, 4)


def layer_bytes(m: int, k: int, n: int, group_size: int, elem: int) -> int:
    groups = -(-k // group_size)
    return k * n // 2 + groups * n // 2 + groups * n * elem + m * k * elem + m * n * elem


@contextmanager
def dequant_min_m(value: int):
    """Force ops.gemm's path: 1 = always dequantize + matmul, huge = always fused kernel."""
    old = ops.CUDA_DEQUANT_MIN_M
    ops.CUDA_DEQUANT_MIN_M = value
    try:
        yield
    finally:
        ops.CUDA_DEQUANT_MIN_M = old


# --- CUDA timing -----------------------------------------------------------------------------


def cuda_time_us(fns, calls: int, iters: int, use_graph: bool = True) -> tuple[float, str]:
    """Median GPU microseconds per call; fns are rotated (each reads its own weight copy)."""
    seq = [fns[i % len(fns)] for i in range(calls)]
    note = "graph"
    for f in fns:  # warm-up, and allocator/caches settle before capture
        f()
    torch.cuda.synchronize()
    run = None
    if use_graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for f in seq:
                    f()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for f in seq:
                    f()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
            note = f"eager (graph capture failed: {type(e).__name__})"
            torch.cuda.synchronize()
    if run is None:
        def run():
            for f in seq:
                f()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times), note


def copy_bandwidth_gbs(iters: int) -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes / time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us, _ = cuda_time_us([lambda: dst.copy_(src)], calls=1, iters=max(iters // 4, 10), use_graph=False)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def int4pack_fns(k, n, group_size, m, copies):
    """torch's own int4 matmul (tinygemm layout), or (None, why) when unavailable."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None, "torch has no aten._weight_int4pack_mm"
    try:
        fns = []
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        for _ in range(copies):
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            try:  # torch >= 2.5: uint8 [N, K/2], two codes per byte (even k in the high nibble)
                packed_src = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
                packed = torch.ops.aten._convert_weight_to_int4pack(packed_src, 8)
            except RuntimeError:  # older torch: int32 [N, K] codes
                packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
            sz = torch.rand(k // group_size, n, 2, dtype=torch.bfloat16, device="cuda")
            fns.append(lambda p=packed, s=sz: torch.ops.aten._weight_int4pack_mm(x, p, group_size, s))
        fns[0]()
        return fns, ""
    except Exception as e:  # noqa: BLE001 - any failure means "not available here", say why
        return None, f"_weight_int4pack_mm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def bench_cuda(args) -> dict:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    elem = 2
    copy_gbs = copy_bandwidth_gbs(args.iters)
    print(f"device: {torch.cuda.get_device_name()}  ops backend: {ops.backend()}")
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (1 GiB device-to-device, read + write)")
    rows, notes = [], set()
    header = (f"{'K x N':>12} {'M':>5} {'ops.gemm us':>11} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} "
              f"{'torch us':>9} {'speedup':>8} {'fused us':>9} {'deq+mm us':>9} {'int4pack':>9}")
    print(header)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        qbytes = k * n // 2
        copies = max(2, min(32, math.ceil(ROTATE_BYTES / qbytes)))
        layers = [random_layer(k, n, args.group_size, dtype, "cuda") for _ in range(copies)]
        dense_copies = max(2, min(32, math.ceil(ROTATE_BYTES / (2 * k * n))))
        dense = [torch.randn(k, n, dtype=dtype, device="cuda") for _ in range(dense_copies)]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            fns = [lambda L=L: ops.gemm(x, L) for L in layers]
            calls = max(len(fns), args.calls)
            us, note = cuda_time_us(fns, calls, args.iters)
            notes.add(note)
            with dequant_min_m(1 << 62):
                fused_us, _ = cuda_time_us(fns, calls, args.iters)
            with dequant_min_m(1):
                deq_us, _ = cuda_time_us(fns, calls, args.iters)
            torch_us, _ = cuda_time_us([lambda w=w: torch.matmul(x, w) for w in dense], calls, args.iters)
            i4_fns, why = int4pack_fns(k, n, args.group_size, m, min(copies, 8))
            i4_us = cuda_time_us(i4_fns, calls, args.iters)[0] if i4_fns else None
            if why:
                notes.add(why)
            gbs = layer_bytes(m, k, n, args.group_size, elem) / (us * 1e-6) / 1e9
            row = {
                "k": k, "n": n, "m": m, "dtype": args.dtype, "group_size": args.group_size,
                "us": us, "gbs": gbs, "copy_share": gbs / copy_gbs, "tflops": 2 * m * k * n / (us * 1e-6) / 1e12,
                "torch_us": torch_us, "speedup_vs_torch": torch_us / us,
                "fused_us": fused_us, "dequant_matmul_us": deq_us,
                "int4pack_us": i4_us, "speedup_vs_int4pack": (i4_us / us) if i4_us else None,
            }
            rows.append(row)
            i4 = f"{i4_us:9.1f}" if i4_us else f"{'-':>9}"
            print(f"{shape:>12} {m:5d} {us:11.1f} {gbs:7.0f} {100 * gbs / copy_gbs:5.0f}% {row['tflops']:8.2f} "
                  f"{torch_us:9.1f} {torch_us / us:7.2f}x {fused_us:9.1f} {deq_us:9.1f} {i4}")
            del x
        del layers, dense
        torch.cuda.empty_cache()
    for note in sorted(notes):
        print("note:", note)
    return {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "backend": ops.backend(),
            "torch": torch.__version__, "timing": sorted(notes), "rows": rows,
            "cuda_dequant_min_m": ops.CUDA_DEQUANT_MIN_M}


def runnable_bodies(asked: list[str], detected: str) -> list[str]:
    """The CPU bodies to time for --isa: one this CPU lacks becomes the best it has (said once on
    stderr), so no column is labelled with a body that did not run; duplicates dropped."""
    out = []
    for isa in asked:
        if ops.CPU_ISAS.index(isa) < ops.CPU_ISAS.index(detected):
            print(f"note: --isa {isa}: this CPU runs at most the {detected} body; timing {detected} instead",
                  file=sys.stderr)
            isa = detected
        if isa not in out:
            out.append(isa)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help=f"comma-separated KxN (default CUDA {SHAPES}, CPU {CPU_SHAPES})")
    p.add_argument("--m", default=None, help=f"comma-separated rows of x (default CUDA {CUDA_M}, CPU {CPU_M})")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (default CUDA 50, CPU 15)")
    p.add_argument("--calls", type=int, default=64, help="CUDA: calls per graph replay")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="CUDA activation dtype")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", default="1,2", help="CPU: comma-separated torch thread counts")
    p.add_argument("--isa", default=None,
                   help="CPU: comma-separated kernel bodies to time, the first one in the GB/s columns (default: "
                        f"the best this CPU runs and the lower SIMD ones; from {', '.join(ops.CPU_ISAS)})")
    p.add_argument("--huge-pages", action="store_true",
                   help="CPU: also time the first body on the same 4-bit weights packed into one arena on transparent "
                        "huge pages, as load_quantized leaves a model's (bluelm_quant.huge_pages), and there in column "
                        "blocks, as prepare_cpu_decode leaves a decoding model's (bluelm_quant.column_blocks)")
    p.add_argument("--heads", default=CPU_HEADS, help="CPU: comma-separated NxK int8 lm_head shapes ('' for none)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="CPU: the median of the timed repetitions, or the fastest (a busy machine's quiet moments)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device visible to torch")
        args.shapes = args.shapes or SHAPES
        args.m = args.m or CUDA_M
        args.iters = args.iters or 50
        result = bench_cuda(args)
    else:
        args.shapes = CPU_SHAPES if args.shapes is None else args.shapes
        args.m = args.m or CPU_M
        args.iters = args.iters or 15
        best = ops.cpu_isa() or "scalar"
        simd = ops.CPU_ISAS[ops.CPU_ISAS.index(best):ops.CPU_ISAS.index("scalar")] or [best]
        args.isa = args.isa.split(",") if args.isa else list(simd)
        unknown = [i for i in args.isa if i not in ops.CPU_ISAS]
        if unknown:
            p.error(f"--isa {','.join(unknown)}: unknown CPU body; use {', '.join(ops.CPU_ISAS)}")
        ext = extension.quant_cuda()
        args.isa = runnable_bodies(args.isa, ext.cpu_isa_detected if ext is not None else "scalar")
        result = bench_cpu(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
