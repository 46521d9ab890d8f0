"""The gateway to the quant_cuda kernels: which code runs each quantized matmul.

Every quantized matmul goes through `gemm`; it checks its inputs, then runs the
extension's kernel when one exists for the device, dtype and bit width, and the
reference path (dequantize, then matmul: qlayer.py) otherwise. The reference path is also
the oracle that the kernels are tested against.

Which path runs (`backend()` says what was built; every fallback is logged once):
  kernel     4-bit layers that `prepare` accepted, with the compiled `quant_cuda` module:
             CPU float32/bfloat16 (float16 computed in float32), CUDA float16/bfloat16
             (float32 computed in float16, the GPTQ ecosystem's compute dtype).
             At M = prod(x.shape[:-1]) >= *_DEQUANT_MIN_M rows: dequantize once + torch.matmul
             (CPU: not with the AMX body, which stays faster).
             Each configuration checks itself against the reference path on first use
             (kernel_check.py) and falls back to it on a mismatch.
  reference  everything else: 2/3/8-bit, float64, act-order layouts whose groups are not
             contiguous runs after sorting, or no compiled extension. The ops have no
             backward: QuantLinear wraps gemm in autograd.QuantMatmul (the input gradient,
             from `dequantize_columns` blocks); gemm called directly on an x that needs a
             gradient takes the reference path, whose matmul autograd can differentiate.

`GemmPlan` is gemm's decision taken once for a layer (the decode loop's per-call fast path);
`dequantize_columns` gives blocks of the weight (the input gradient, autograd.py).

The modules around it import in one direction (ops imports them; they never import ops):
  extension.py     the loaded quant_cuda module (or why not), QuantOpError, the one-time warnings
  cpu_settings.py  the CPU kernel body (`cpu_isa`, `set_cpu_isa`, BLUELM_QUANT_CPU_ISA), thread counts
  qlayer.py        QLayer: the tensor layout, its checks, the reference path, `prepare`
  int8_ops.py      `gemm_int8`, the int8 lm_head's kernel call
ops re-exports their public names, so `ops.prepare`, `ops.set_cpu_isa`, `ops.gemm_int8` and the
rest stay the API. The fake implementations for torch.compile stay here: the extension names
this module (`m.set_python_module("bluelm_quant.ops")`) and torch checks where they are registered.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_settings, extension, kernel_check
from .cpu_settings import CPU_ISAS, cpu_isa, kernel_threads, kernel_threads_setting, set_cpu_isa, set_kernel_threads
from .extension import QuantOpError, warn_once
from .int8_ops import gemm_int8, int8_kernel_runs
from .packing import pack_multiple
from .qlayer import (QLayer, check_activation, check_layer, dequantize, dequantize_reference, gemm_reference, prepare,
                     repack_rows, standard_qweight, to_column_blocks)

# From this many activation rows on, dequantize the whole weight once and call the vendor
# GEMM instead of the fused kernel.
# CPU: measured on the shared 2-core dev machine (AMD EPYC, AVX2 path, fp32, group 128,
# load average ~8 from other jobs, so absolute times are inflated), median ms of 15,
# fused kernel / dequantize + torch.matmul / dense fp32 torch.matmul:
#   4096x11008, 2 threads: M=1 20/338/30, M=64 282/687/345, M=128 528/847/516
#   4096x4096,  2 threads: M=64 143/354/210, M=256 461/614/428, M=512 977/716/600
#   4096x4096,  1 thread:  M=256 426/394/286
# The fused kernel keeps up with MKL's SGEMM to M ~ 128 and the crossover lies at M ~ 256.
# The dequantized weight is fp32 on CPU (fp32 SGEMM, and as accurate as the fused kernel).
# The AVX-512 body (same machine, Xeon, load ~10, best of 7 ms, fused / dequantize + matmul,
# 4096x4096, 1 thread): M=64 52/151, M=256 223/278, M=512 358/249: the crossover stays.
CPU_DEQUANT_MIN_M = 256
# With AMX tiles (cpu_isa() == "amx") the fused kernel stays ahead at every M measured,
# same runs: M=64 23/151, M=256 64/278, M=512 105/249 (2 threads 185/462; 576x1536: M=512
# 8.8/21.9), so it never hands over.
CPU_AMX_DEQUANT_MIN_M = 1 << 62
# CUDA: placeholder until measured on a GPU (tools/bench_kernels.py); exllamav2 switches
# at a few dozen rows for the same reason.
CUDA_DEQUANT_MIN_M = 64


def _gemm_reference_layer(x: torch.Tensor, layer: QLayer) -> torch.Tensor:
    """gemm_reference for any layout (a permuted one multiplies the permuted x)."""
    if layer.perm is None:
        return gemm_reference(x, layer.column_qweight(), layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)
    xp = x.index_select(-1, layer.perm)
    return gemm_reference(xp, layer.column_qweight(), layer.qzeros, layer.scales, layer.kernel_g_idx(), layer.bits, layer.bias)


def backend() -> str:
    """What quantized matmuls run on: 'cuda+cpu kernels (...)', 'cpu-kernel (...)' or 'reference (...)'."""
    ext = extension.quant_cuda()
    if ext is None:
        return f"reference (extension not built: {extension.load_error()})"
    if ext.with_cuda:
        return f"cuda+cpu kernels (TORCH_CUDA_ARCH_LIST {ext.cuda_archs}; CPU {ext.get_cpu_isa()})"
    return f"cpu-kernel ({ext.get_cpu_isa()}; no CUDA kernels in this build)"


if extension.quant_cuda() is not None:
    # Shapes for torch.compile / fake tensors; the C++ schemas point here (set_python_module).
    @torch.library.register_fake("bluelm_quant::gemm_4bit")
    def _gemm_4bit_fake(x, qweight, qzeros, scales, perm, group_size, bias):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {tuple(x.shape)}")
        # qweight [K/8, N], or in column blocks [N/W, K/8, W] (QLayer.kernel_qweight)
        k, n = ((qweight.shape[1], qweight.shape[0] * qweight.shape[2]) if qweight.dim() == 3
                else (qweight.shape[0], qweight.shape[1]))
        torch._check(x.shape[1] == k * 8, lambda: f"x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)}")
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("bluelm_quant::dequantize_4bit")
    def _dequantize_4bit_fake(qweight, qzeros, scales, group_size, dtype=None):
        return scales.new_empty((qweight.shape[0] * 8, qweight.shape[1]), dtype=dtype or scales.dtype)

    if hasattr(torch.ops.bluelm_quant, "decode_attention"):  # an extension built before it lacks the op
        @torch.library.register_fake("bluelm_quant::decode_attention")
        def _decode_attention_fake(q, k, v, mask, scale):
            return q.new_empty(q.shape)

    if hasattr(torch.ops.bluelm_quant, "decode_qkv"):  # likewise (cpu_decode.py)
        @torch.library.register_fake("bluelm_quant::decode_qkv")
        def _decode_qkv_fake(x, norm_weight, eps, qkv, group_size, cos, sin, heads, kv_heads):
            b, d = x.shape[0], cos.shape[-1]
            return x.new_empty((b, heads, d)), x.new_empty((b, kv_heads, d)), x.new_empty((b, kv_heads, d))

        @torch.library.register_fake("bluelm_quant::decode_o_mlp")
        def _decode_o_mlp_fake(x, attn, o, o_group_size, norm_weight, eps, gate_up, gate_up_group_size, down,
                               down_group_size):
            return x.new_empty(x.shape)

    @torch.library.register_fake("bluelm_quant::gemm_int8")
    def _gemm_int8_fake(x, weight, scale, bias):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {tuple(x.shape)}")
        torch._check(x.shape[1] == weight.shape[1], lambda: f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
        return x.new_empty((x.shape[0], weight.shape[0]))


# --- dispatch --------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype | None, str]:
    """The dtype the kernel runs in for x, or (None, why not)."""
    ext = extension.quant_cuda()
    if ext is None:
        return None, f"the quant_cuda extension is not usable ({extension.load_error()}); all quantized matmuls use the reference path"
    if x.device.type == "cpu":
        if not torch.compiler.is_compiling():  # torch.get_num_threads() would break the graph
            cpu_settings.check_cpu_threads()
        if x.dtype in (torch.float32, torch.bfloat16):
            return x.dtype, ""
        if x.dtype == torch.float16:
            return torch.float32, ""  # no fp16 CPU kernel; fp32 is exact for fp16 inputs
    elif x.device.type == "cuda":
        if not ext.with_cuda:
            return None, "quant_cuda was built without CUDA kernels (CPU-only build): CUDA tensors use the reference path"
        if x.dtype in (torch.float16, torch.bfloat16):
            return x.dtype, ""
        if x.dtype == torch.float32:
            return torch.float16, ""
    else:
        return None, f"no quant_cuda kernels for device type {x.device.type!r}: reference path"
    return None, f"no kernel for {x.dtype} activations on {x.device.type}: reference path"


def _dequant_min_m(device: torch.device) -> int:
    if device.type == "cuda":
        return CUDA_DEQUANT_MIN_M
    return CPU_AMX_DEQUANT_MIN_M if cpu_settings.cpu_isa() == "amx" else CPU_DEQUANT_MIN_M


def _path(m: int, device: torch.device) -> str:
    """The kernel code that runs for m rows (the self-check's unit)."""
    if m >= _dequant_min_m(device):
        return "dequantize + matmul"
    return f"{kernel_check.m_class(m)}-row kernel"


def _run_kernel(x2: torch.Tensor, layer: QLayer, dtype: torch.dtype) -> torch.Tensor:
    """The compiled path for x2 [M, K] in `dtype`; the result in `dtype` (float32 for the CPU dequant path)."""
    s = layer.scales.to(dtype)
    b = layer.bias.to(dtype) if layer.bias is not None else None
    x2 = x2.to(dtype)
    if x2.shape[0] >= _dequant_min_m(x2.device):
        mm_dtype = dtype if x2.is_cuda else torch.float32  # fp32 SGEMM on the CPU: as accurate as the fused kernel
        w = torch.ops.bluelm_quant.dequantize_4bit(layer.column_qweight(), layer.qzeros, s, layer.group_size, mm_dtype)
        xp = (x2 if layer.perm is None else x2.index_select(1, layer.perm)).to(mm_dtype)
        y = torch.matmul(xp, w) if b is None else torch.addmm(b.to(mm_dtype), xp, w)
    else:
        y = torch.ops.bluelm_quant.gemm_4bit(x2, layer.kernel_qweight(), layer.qzeros, s, layer.perm, layer.group_size, b)
    fault = kernel_check.STATE.fault
    return y if fault is None else fault(y)


def _self_check(layer: QLayer, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Every M-path of this configuration on the layer's first CHECK_COLUMNS output columns:
    {path: (max |kernel - reference|, max |reference|)}. A layer in column blocks is checked on
    those columns in blocks of their own (two where they split in multiples of 8, else one)."""
    n = min(layer.qweight.shape[1], kernel_check.CHECK_COLUMNS)
    cols = n * layer.bits // 32
    qweight, block = layer.column_qweight(0, n).contiguous(), None
    if layer.block is not None:
        block = n // 2 if n % 16 == 0 else n
        qweight = to_column_blocks(qweight, block)
    part = layer._replace(qweight=qweight, qzeros=layer.qzeros[:, :cols].contiguous(),
                          scales=layer.scales[:, :n].contiguous(),
                          bias=None if layer.bias is None else layer.bias[:n].contiguous(), block=block)
    ref_layer = part._replace(scales=part.scales.to(dtype).float(),
                              bias=None if part.bias is None else part.bias.to(dtype).float())
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    rows = list(kernel_check.REPRESENTATIVE_M)
    if _dequant_min_m(device) <= kernel_check.MAX_CHECK_M:  # a path that runs at all
        rows.append(_dequant_min_m(device))
    for m in rows:
        x = torch.randn(m, part.in_features, generator=gen, device=device).to(dtype)
        ref = _gemm_reference_layer(x.float(), ref_layer)
        got = _run_kernel(x, part, dtype).float()
        out[_path(m, device)] = (float((got - ref).abs().max()), float(ref.abs().max()))
    return out


def _config_key(layer: QLayer, device: torch.device, dtype: torch.dtype) -> tuple:
    """The self-check's configuration (kernel_check): what selects kernel code besides the M-path.
    gemm, plan_gemm and dequantize_columns must read the same verdicts, so they share this key."""
    return (device, dtype, layer.bits, layer.group_size, layer.perm is not None, layer.block is not None,
            layer.in_features, cpu_settings.cpu_isa() if device.type == "cpu" else None)


def gemm(x: torch.Tensor, layer: QLayer) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K]; output in x's dtype. `layer` as `prepare` made it."""
    k = layer.in_features
    check_activation(x, layer.qweight, k)
    if layer.group_size is None or (x.requires_grad and torch.is_grad_enabled()):
        return _gemm_reference_layer(x, layer)
    dtype, why = _compute_dtype(x)
    if dtype is None:
        warn_once(why)
        return _gemm_reference_layer(x, layer)
    x2 = x.reshape(-1, k)
    key = _config_key(layer, x.device, dtype)
    if not kernel_check.STATE.path_ok(key, _path(x2.shape[0], x.device), lambda: _self_check(layer, dtype, x.device)):
        return _gemm_reference_layer(x, layer)
    return _run_kernel(x2, layer, dtype).to(x.dtype).reshape(*x.shape[:-1], layer.qweight.shape[1])


# --- the per-call fast path ---------------------------------------------------------------------
#
# gemm() decides per call: input checks, dtype and device, the M-path, the self-check verdict,
# scales converted to the compute dtype. At batch 1 that Python costs ~24 us a call, more than the
# kernel itself on a small model's layers (SmolLM2's 576x576: 11 us): 210 layers make it ~5 ms of
# each decode step. A GemmPlan is that decision taken once, after a checked call, for activations
# of one device and dtype; QuantLinear keeps it and calls the op directly while it applies.


class GemmPlan(NamedTuple):
    """A layer's kernel call for activations of one device and compute dtype (see plan_gemm)."""

    device: torch.device
    dtype: torch.dtype
    qweight: torch.Tensor  # as the op takes it (QLayer.kernel_qweight: [N/W, K/8, W] in column blocks)
    qzeros: torch.Tensor
    scales: torch.Tensor  # already in `dtype`
    perm: torch.Tensor | None
    group_size: int
    bias: torch.Tensor | None  # already in `dtype`
    in_features: int
    out_features: int
    max_rows: int  # the plan covers M < max_rows (the fused kernel's M-paths, all self-checked)
    cpu_isa: str | None  # the CPU body the verdicts were given for
    epoch: int  # kernel_check.STATE.epoch when made


def plan_gemm(x: torch.Tensor, layer: QLayer) -> GemmPlan | None:
    """The plan for activations like x, or None where gemm(x, layer) needs its per-call decisions:
    the reference path, a dtype the kernel computes in another one, scales or bias stored in
    another dtype (converted per call rather than kept twice), or an M-path the self-check
    refused. Call it after gemm(x, layer) has run once (the self-check has then judged every
    M-path of the configuration)."""
    if layer.group_size is None or extension.quant_cuda() is None or torch.compiler.is_compiling():
        return None
    dtype, _ = _compute_dtype(x)
    if dtype is None or dtype != x.dtype or layer.scales.dtype != dtype:
        return None
    if layer.bias is not None and layer.bias.dtype != dtype:
        return None
    body = cpu_settings.cpu_isa() if x.device.type == "cpu" else None
    key = _config_key(layer, x.device, dtype)
    state = kernel_check.STATE
    max_rows = _dequant_min_m(x.device)
    paths = {_path(m, x.device) for m in kernel_check.REPRESENTATIVE_M if m < max_rows}
    if state.enabled and any(state.verdicts.get((key, p), "unchecked") is not None for p in paths):
        return None
    return GemmPlan(x.device, dtype, layer.kernel_qweight(), layer.qzeros, layer.scales, layer.perm, layer.group_size,
                    layer.bias, layer.in_features, layer.qweight.shape[1], max_rows, body, state.epoch)


def plan_applies(plan: GemmPlan, x: torch.Tensor) -> bool:
    """Whether run_plan(plan, x) gives what gemm(x, layer) would (cheap: attribute compares and the CPU body)."""
    return (
        x.shape[-1] == plan.in_features
        and not (x.requires_grad and torch.is_grad_enabled())
        and plan_ready(plan, x.device, x.dtype, x.numel() // plan.in_features)
    )


def plan_ready(plan: GemmPlan, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    """Whether the plan's kernel call still stands for `rows` rows of activations of this device and
    dtype (cpu_decode.py hands plans to its ops; plan_applies for one x, with its gradient check).
    Gradients are the caller's to rule out: the kernels have no backward."""
    state = kernel_check.STATE
    return (
        dtype == plan.dtype
        and device == plan.device
        and rows < plan.max_rows
        and plan.cpu_isa == (cpu_settings.cpu_isa() if plan.device.type == "cpu" else None)
        and plan.epoch == state.epoch
        and state.fault is None
    )


def run_plan(plan: GemmPlan, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T (+ bias) on the fused kernel; check plan_applies(plan, x) first."""
    x2 = x if x.dim() == 2 else x.reshape(-1, plan.in_features)
    y = torch.ops.bluelm_quant.gemm_4bit(x2, plan.qweight, plan.qzeros, plan.scales, plan.perm, plan.group_size,
                                         plan.bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.out_features)


# --- blocks of the weight (the input gradient, autograd.py) -----------------------------------


def dequantize_columns(layer: QLayer, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Output columns [start, stop) of W^T: [K, stop - start] in `dtype`, its rows in qweight's
    stored order (perm order for an act-order kernel layout; row r is input row perm[r]).

    start and stop must be multiples of pack_multiple(bits) (qzeros are packed along N), as are
    QuantLinear's out_features. The compiled dequantize runs where gemm's "dequantize + matmul"
    path would (a 4-bit kernel layout, a dtype the device has kernels for, self-check passed);
    the reference dequantization otherwise.
    """
    bits, n = layer.bits, layer.qweight.shape[1]
    multiple = pack_multiple(bits)
    if not (0 <= start < stop <= n) or start % multiple or stop % multiple:
        raise QuantOpError(f"columns [{start}, {stop}) of N={n}: both ends must be multiples of {multiple} at {bits} bits")
    qweight = layer.column_qweight(start, stop).contiguous()
    qzeros = layer.qzeros[:, start * bits // 32 : stop * bits // 32].contiguous()
    scales = layer.scales[:, start:stop].contiguous()
    if _dequantize_kernel_ok(layer, dtype):
        return torch.ops.bluelm_quant.dequantize_4bit(qweight, qzeros, scales.to(dtype), layer.group_size, dtype)
    return dequantize_reference(qweight, qzeros, scales, layer.kernel_g_idx(), bits, dtype)


def _dequantize_kernel_ok(layer: QLayer, dtype: torch.dtype) -> bool:
    device = layer.qweight.device
    ext = extension.quant_cuda()
    if ext is None or layer.group_size is None or layer.bits != 4:
        return False
    if device.type == "cpu":
        supported = (torch.float32, torch.bfloat16)
    elif device.type == "cuda" and ext.with_cuda:
        supported = (torch.float16, torch.bfloat16)
    else:
        return False
    if dtype not in supported:
        return False
    key = _config_key(layer, device, dtype)
    return kernel_check.STATE.path_ok(key, "dequantize", lambda: _dequantize_self_check(layer, dtype))


def _dequantize_self_check(layer: QLayer, dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """The compiled dequantize against the reference on the layer's first CHECK_COLUMNS output columns."""
    n = min(layer.qweight.shape[1], kernel_check.CHECK_COLUMNS)
    qweight, qzeros = layer.column_qweight(0, n).contiguous(), layer.qzeros[:, : n * layer.bits // 32].contiguous()
    scales = layer.scales[:, :n].to(dtype).contiguous()
    ref = dequantize_reference(qweight, qzeros, scales.float(), layer.kernel_g_idx(), layer.bits, torch.float32)
    got = torch.ops.bluelm_quant.dequantize_4bit(qweight, qzeros, scales, layer.group_size, dtype).float()
    return {"dequantize": (float((got - ref).abs().max()), float(ref.abs().max()))}


__all__ = [
    "CPU_ISAS",
    "GemmPlan",
    "QLayer",
    "QuantOpError",
    "backend",
    "cpu_isa",
    "check_layer",
    "dequantize",
    "dequantize_columns",
    "dequantize_reference",
    "gemm",
    "gemm_int8",
    "gemm_reference",
    "int8_kernel_runs",
    "pack_multiple",
    "plan_applies",
    "plan_gemm",
    "plan_ready",
    "prepare",
    "repack_rows",
    "run_plan",
    "kernel_threads",
    "kernel_threads_setting",
    "set_cpu_isa",
    "set_kernel_threads",
    "standard_qweight",
    "to_column_blocks",
]
