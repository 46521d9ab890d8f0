"""CPU half of tools/bench_kernels.py: the 4-bit GEMM and the int8 lm_head, in GB/s against the
read bandwidth this script measures, beside torch's fp32 and bf16 matmul and its own int4 / int8
CPU kernels.

Every variant of a row is timed in the same loop, one call each per repetition in a shuffled
order (so machine load and the caches left by the previous call hit them alike), rotating through enough weight copies (ROTATE_BYTES) that the last
level cache never holds the weights; the table gives medians. GB/s counts the bytes a call
must read and write: packed weights, zeros, scales, x and the output. The read bandwidth of
a row ("read" variant, %bw's denominator) is torch.ops.bluelm_quant.read_probe over buffers of
the weights' size, rotated and timed in the same loop: a plain read on the kernels' own thread
pool, the same size of read at the same moments, so a busy machine slows both alike. (torch.sum
with 2 threads is no bar on a loaded machine: its OpenMP region waits for a descheduled
thread, ~16 ms a call measured.) torch.sum and read_probe over 1 GiB are printed per thread
count for reference. --stat best reports the fastest repetition instead of the median: what
the code does when the machine is momentarily quiet. --huge-pages adds the first body on copies of
the weights on 4 KB pages ("4k") and packed into one arena on transparent huge pages, as loaded
models hold them (bluelm_quant.huge_pages; "2M"), and in such an arena in column blocks, as
cpu_decode.prepare_cpu_decode leaves a decoding model's layers that are wide enough
(bluelm_quant.column_blocks; "blk"), timed in the same loop. Those three read copies of
their own: the other variants share theirs within a repetition (the body columns and ops.gemm read
copy r together), so the second reader of a copy may find it in the L3 (measured: the first body's
4096x11008 M=1 time 2.0 -> 1.7 ms at 2 threads once ops.gemm was timed beside it).
"""
from __future__ import annotations

import math
import random
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from bluelm_quant import int8_ops, ops
from bluelm_quant.column_blocks import block_width
from bluelm_quant.huge_pages import pack_kernel_tensors
from bluelm_quant.nn import QuantLinear
from bluelm_quant.placement import Int8Linear

ROTATE_BYTES = 400 << 20  # > the 300 MB L3 of the dev machine's Xeon
BANDWIDTH_BYTES = 1 << 30
STATS = {"median": statistics.median, "best": min}


def read_bandwidth_gbs(reps: int = 10) -> dict:
    """{torch.sum, read_probe: median GB/s over 1 GiB} at the current torch thread count."""
    buf = torch.ones(BANDWIDTH_BYTES // 4)
    t = time_interleaved({"torch.sum": [buf.sum], "read_probe": [lambda: torch.ops.bluelm_quant.read_probe(buf)]},
                         reps, statistics.median)
    return {name: BANDWIDTH_BYTES / v / 1e9 for name, v in t.items()}


def copies_for(nbytes: int) -> int:
    return max(2, min(1024, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def time_interleaved(variants: dict, reps: int, stat) -> dict:
    """{name: stat(seconds per call)}; variants: {name: [fn per weight copy]}."""
    for fns in variants.values():  # warm-up: first-touch of every copy, thread pools started
        for f in fns:
            f()
    times = {name: [] for name in variants}
    order, rng = list(variants), random.Random(0)
    for r in range(reps):
        rng.shuffle(order)  # a fixed order would always time the same variant right after a big read
        for name in order:
            f = variants[name][r % len(variants[name])]
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: stat(t) for name, t in times.items()}


@contextmanager
def cpu_isa(name: str):
    ops.set_cpu_isa(name)
    try:
        yield
    finally:
        ops.set_cpu_isa("best")


def with_isa(isa: str, fn):
    def call():
        with cpu_isa(isa):
            return fn()

    return call


# --- the 4-bit GEMM ---------------------------------------------------------------------------


def random_4bit(k: int, n: int, group_size: int):
    groups = -(-k // group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (groups, n // 8), dtype=torch.int32)
    scales = torch.rand(groups, n) * 0.02 + 0.001
    g_idx = (torch.arange(k, dtype=torch.int32) // group_size)
    return qweight, qzeros, scales, g_idx, ops.prepare(qweight, qzeros, scales, g_idx, 4)


def page_copies(layers: list, k: int, n: int, group_size: int) -> dict:
    """random_4bit's layers copied, (qweight as the op takes it, qzeros, scales) each: {"4k": plain
    allocations, "2M": one huge-page arena, as pack_kernel_tensors leaves a loaded model's, "blk": another
    arena in column blocks, as prepare_cpu_decode leaves a decoding model's (only where N has a
    column_blocks.block_width)}."""
    def quant_linears() -> nn.ModuleList:
        out = nn.ModuleList()
        for qweight, qzeros, scales, g_idx, _ in layers:
            q = QuantLinear(k, n, 4, group_size, dtype=scales.dtype, device="meta")
            q.qweight, q.qzeros, q.scales, q.g_idx = qweight.clone(), qzeros.clone(), scales.clone(), g_idx
            q.post_init()
            out.append(q)
        return out

    def args(modules) -> list:
        return [(q.quant_layer().kernel_qweight(), q.qzeros, q.scales) for q in modules]

    packed = quant_linears()
    copies = {"4k": args(packed)}  # the clones stay: the 4 KB-page copies
    pack_kernel_tensors(packed)
    copies["2M"] = args(packed)
    width = block_width(n)
    if width is not None:
        blocked = quant_linears()
        pack_kernel_tensors(blocked)
        for q in blocked:
            q.use_column_blocks(width)
        copies["blk"] = args(blocked)
    return copies


def bytes_4bit(m: int, k: int, n: int, group_size: int) -> int:
    groups = -(-k // group_size)
    return k * n // 2 + groups * n // 2 + groups * n * 4 + m * k * 4 + m * n * 4


def int4pack_copies(k: int, n: int, group_size: int, copies: int):
    """torch's own int4 CPU kernel (tinygemm layout), or (None, why not). bf16 activations and
    scales: its fast path (float32 measured ~7x slower on 4096x4096)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None, "this torch has no aten._weight_int4pack_mm_for_cpu"
    try:
        out = []
        for _ in range(copies):
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            out.append((packed, torch.rand(k // group_size, n, 2, dtype=torch.bfloat16)))
        x = torch.randn(1, k, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, out[0][0], group_size, out[0][1])
        return out, ""
    except Exception as e:  # noqa: BLE001 - any failure means "not available here": say why
        return None, f"_weight_int4pack_mm_for_cpu unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


def bench_4bit(args, threads: int, notes: set) -> list:
    rows = []
    gs = args.group_size
    op = torch.ops.bluelm_quant.gemm_4bit
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        layers = [random_4bit(k, n, gs) for _ in range(copies_for(k * n // 2))]
        pages = page_copies(layers, k, n, gs) if args.huge_pages else {}
        dense = [torch.randn(k, n) for _ in range(copies_for(4 * k * n))]
        dense16 = [w.to(torch.bfloat16) for w in dense[: copies_for(2 * k * n)]]
        int4, why = int4pack_copies(k, n, gs, copies_for(k * n // 2))
        reads = [torch.ones(k * n // 8) for _ in range(copies_for(k * n // 2))]
        if why:
            notes.add(why)
        base_s = None  # the M=1 time, for the per-row speedup
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            x16 = x.to(torch.bfloat16)
            variants = {
                isa: [with_isa(isa, lambda L=L: op(x, L[0], L[1], L[2], None, gs, None)) for L in layers]
                for isa in args.isa
            }
            variants["ops.gemm"] = [lambda L=L: ops.gemm(x, L[4]) for L in layers]
            for name, copies in pages.items():
                variants[name] = [with_isa(args.isa[0], lambda c=c: op(x, *c, None, gs, None)) for c in copies]
            variants["read"] = [lambda r=r: torch.ops.bluelm_quant.read_probe(r) for r in reads]
            variants["fp32"] = [lambda w=w: torch.matmul(x, w) for w in dense]
            variants["bf16"] = [lambda w=w: torch.matmul(x16, w) for w in dense16]
            if int4:
                variants["int4"] = [
                    lambda p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, p[0], gs, p[1]) for p in int4
                ]
            t = time_interleaved(variants, args.iters, STATS[args.stat])
            best = args.isa[0]
            gbs = bytes_4bit(m, k, n, gs) / t[best] / 1e9
            read_gbs = k * n / 2 / t["read"] / 1e9
            if m == 1:
                base_s = t[best]
            row = {"k": k, "n": n, "m": m, "threads": threads, "isa": best, "ms": t[best] * 1e3, "gbs": gbs,
                   "read_gbs": read_gbs, "bandwidth_share": gbs / read_gbs,
                   **{f"{name}_ms": v * 1e3 for name, v in t.items()},
                   "per_row_speedup_vs_m1": base_s * m / t[best] if base_s else None}
            rows.append(row)
            other = " ".join(f"{t[i] * 1e3:9.3f}" for i in args.isa[1:])
            i4 = f"{t['int4'] * 1e3:9.3f}" if "int4" in t else f"{'-':>9}"
            per_row = f"{row['per_row_speedup_vs_m1']:6.2f}x" if row["per_row_speedup_vs_m1"] else f"{'-':>7}"
            huge_cols = ""
            if pages:
                row.update({f"gbs_{name}": bytes_4bit(m, k, n, gs) / t[name] / 1e9 for name in pages})
                huge_cols = (f" {t['4k'] * 1e3:9.3f} {t['2M'] * 1e3:9.3f} {row['gbs_4k']:6.1f} {row['gbs_2M']:6.1f} "
                             f"{t['4k'] / t['2M']:6.2f}x")
                if "blk" in t:
                    row["bandwidth_share_blk"] = row["gbs_blk"] / read_gbs
                    huge_cols += f" {t['blk'] * 1e3:9.3f} {row['gbs_blk']:7.1f} {100 * row['gbs_blk'] / read_gbs:6.0f}%"
                else:
                    huge_cols += f" {'-':>9} {'-':>7} {'-':>7}"
            print(f"{shape:>11} {m:3d} {threads:3d} {t[best] * 1e3:9.3f} {gbs:6.1f} {read_gbs:6.1f} "
                  f"{100 * gbs / read_gbs:4.0f}% "
                  f"{other} {t['ops.gemm'] * 1e3:9.3f} {t['fp32'] * 1e3:9.3f} {t['bf16'] * 1e3:9.3f} {i4} "
                  f"{t['fp32'] / t[best]:6.1f}x {per_row}{huge_cols}", flush=True)
        del layers, pages, dense, dense16, int4, reads
    return rows


# --- the int8 lm_head -------------------------------------------------------------------------


def chunked_forward(head: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """Int8Linear's dequantize + matmul path (all it had before the kernel; still its large-M path)."""
    old = int8_ops.CPU_INT8_DEQUANT_MIN_M
    int8_ops.CPU_INT8_DEQUANT_MIN_M = 0
    try:
        return head(x)
    finally:
        int8_ops.CPU_INT8_DEQUANT_MIN_M = old


def bench_int8(args, threads: int) -> list:
    rows = []
    op = torch.ops.bluelm_quant.gemm_int8
    for shape in args.heads.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        heads = [Int8Linear.from_weight(torch.randn(n, k), torch.float32) for _ in range(copies_for(n * k))]
        dense = [torch.randn(n, k) for _ in range(copies_for(4 * n * k))]
        dense16 = [w.to(torch.bfloat16) for w in dense[: copies_for(2 * n * k)]]
        reads = [torch.ones(n * k // 4) for _ in range(copies_for(n * k))]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            x16 = x.to(torch.bfloat16)
            variants = {
                "read": [lambda r=r: torch.ops.bluelm_quant.read_probe(r) for r in reads],
                "int8": [lambda h=h: op(x, h.weight_int8, h.weight_scale, None) for h in heads],
                "chunked": [lambda h=h: chunked_forward(h, x) for h in heads],
                "fp32": [lambda w=w: torch.nn.functional.linear(x, w) for w in dense],
                "bf16": [lambda w=w: torch.nn.functional.linear(x16, w) for w in dense16],
                "int8pack": [lambda h=h: torch.ops.aten._weight_int8pack_mm(x, h.weight_int8, h.weight_scale)
                             for h in heads],
            }
            t = time_interleaved(variants, args.iters, STATS[args.stat])
            gbs = (n * k + 4 * n + 4 * m * k + 4 * m * n) / t["int8"] / 1e9
            read_gbs = n * k / t["read"] / 1e9
            rows.append({"n": n, "k": k, "m": m, "threads": threads, "ms": t["int8"] * 1e3, "gbs": gbs,
                         "read_gbs": read_gbs, "bandwidth_share": gbs / read_gbs,
                         **{f"{name}_ms": v * 1e3 for name, v in t.items()}})
            print(f"{shape:>11} {m:3d} {threads:3d} {t['int8'] * 1e3:9.3f} {gbs:6.1f} {read_gbs:6.1f} "
                  f"{100 * gbs / read_gbs:4.0f}% "
                  f"{t['chunked'] * 1e3:9.3f} {t['fp32'] * 1e3:9.3f} {t['bf16'] * 1e3:9.3f} "
                  f"{t['int8pack'] * 1e3:9.3f} {t['fp32'] / t['int8']:6.1f}x", flush=True)
        del heads, dense, dense16, reads
    return rows


# --- driver -------------------------------------------------------------------------------------


def bench_cpu(args) -> dict:
    print(f"ops backend: {ops.backend()}  torch {torch.__version__}  CPU bodies timed: {', '.join(args.isa)}")
    if "reference" in ops.backend():
        print("note: no compiled CPU kernel: nothing to measure")
        return {"device": "cpu", "backend": ops.backend(), "rows": []}
    result = {"device": "cpu", "backend": ops.backend(), "torch": torch.__version__, "stat": args.stat,
              "bandwidth_gbs": {}, "rows_4bit": [], "rows_int8": []}
    notes: set = set()
    before = torch.get_num_threads()
    try:
        for threads in (int(v) for v in args.threads.split(",")):
            torch.set_num_threads(threads)
            bandwidth = read_bandwidth_gbs()
            result["bandwidth_gbs"][threads] = bandwidth
            print(f"\nthreads {threads}: 1 GiB read, median: torch.sum {bandwidth['torch.sum']:.1f} GB/s, read_probe "
                  f"{bandwidth['read_probe']:.1f} GB/s; %bw below: of the 'read' column, measured in the same loop")
            if args.shapes:
                others = "".join(f" {i + ' ms':>9}" for i in args.isa[1:])
                print(f"{'4-bit K x N':>11} {'M':>3} {'thr':>3} {args.isa[0] + ' ms':>9} {'GB/s':>6} {'read':>6} "
                      f"{'%bw':>5}"
                      f"{others} {'ops.gemm':>9} {'fp32 ms':>9} {'bf16 ms':>9} {'int4 ms':>9} {'vs fp32':>7} "
                      f"{'row/M=1':>7}"
                      + (f" {'4k ms':>9} {'2M ms':>9} {'4k GB/s':>6} {'2M GB/s':>6} {'2M/4k':>7} {'blk ms':>9} "
                         f"{'blk GB/s':>7} {'blk %bw':>7}" if args.huge_pages else ""))
                result["rows_4bit"] += bench_4bit(args, threads, notes)
            if args.heads:
                print(f"{'int8 N x K':>11} {'M':>3} {'thr':>3} {'int8 ms':>9} {'GB/s':>6} {'read':>6} {'%bw':>5} "
                      f"{'chunked':>9} {'fp32 ms':>9} {'bf16 ms':>9} {'int8pack':>9} {'vs fp32':>7}")
                result["rows_int8"] += bench_int8(args, threads)
    finally:
        torch.set_num_threads(before)
    for note in sorted(notes):
        print("note:", note)
    print(f"columns: {args.stat} of {args.iters}; read = read_probe GB/s over the weights' bytes; "
          "%bw = GB/s of the first body / read; "
          "row/M=1 = (M x the M=1 time) / this time; chunked = Int8Linear's dequantize + matmul path; "
          "int4/int8pack = torch's own CPU kernels (int4: bf16 x)"
          + ("; 4k / 2M = the first body on copies of its own, plain / in a huge-page arena (bluelm_quant.huge_pages), "
             "2M/4k = their speedup; blk = the 2M arena in column blocks (bluelm_quant.column_blocks), as a decoding "
             "model holds the layers wide enough for them, blk %bw its share of read" if args.huge_pages else ""))
    return result
