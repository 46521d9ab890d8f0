"""The only gateway to the quant_cuda extension.

Every quantized matmul goes through `gemm`; it checks its inputs, then runs the
extension's kernel when one exists for the device, dtype and bit width, and the
reference path (dequantize, then matmul) otherwise. The reference path is also the
oracle that the kernels are tested against.

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

The CPU kernels run the best body the CPU has (`cpu_isa()`: amx, avx512, avx2, scalar);
`set_cpu_isa` or BLUELM_QUANT_CPU_ISA pick a lower one, on as many threads as
torch.get_num_threads() (at most the CPUs this process may use).

`gemm_int8` is the same gateway for a weight-only int8 matrix with one scale per output
row (the quantized lm_head, placement.Int8Linear): CPU kernel when `int8_kernel_runs(x)`.

Tensor layout (the standard GPTQ one, K = in_features, N = out_features):
  qweight int32 [K*bits/32, N]   codes packed along K, least-significant bits first
  qzeros  int32 [G, N*bits/32]   v1 zeros (zero - 1) packed along N
  scales  fp16/bf16/fp32 [G, N]
  g_idx   int32 [K]              group of each input row (any order: act-order)

A layer's tensors travel as a QLayer. `prepare` turns the standard layout into the kernel's:
for act-order, the rows of qweight are regrouped (one copy, not two) and `perm` says which
input row each holds; `standard_qweight` gives the checkpoint's order back for saving.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from . import kernel_check
from .packing import pack_multiple, permute_rows, unpack_qweight, unpack_qzeros

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

log = logging.getLogger(__name__)

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


class QuantOpError(ValueError):
    """Inputs to a quantized op do not fit together."""


class QLayer(NamedTuple):
    """The tensors of one quantized Linear, as `gemm` and `dequantize` take them."""

    qweight: torch.Tensor  # [K*bits/32, N]; rows in `perm` order when perm is set
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor  # [K]: the group of each input row, in the original row order
    bits: int
    bias: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # int32 [K]: row r of qweight is input row perm[r]
    group_size: int | None = None  # the kernel layout's contiguous group size; None: reference path only

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    def kernel_g_idx(self) -> torch.Tensor:
        """The group of each row of qweight as stored (g_idx in perm order)."""
        return self.g_idx if self.perm is None else self.g_idx.index_select(0, self.perm)


def check_layer(qweight, qzeros, scales, g_idx, bits: int) -> tuple[int, int, int]:
    """Validate the four tensors against each other; returns (K, N, groups)."""
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32), ("g_idx", g_idx, torch.int32)):
        if t.dtype != dtype:
            raise QuantOpError(f"{name} must be {dtype}, got {t.dtype}")
    if scales.dtype not in FLOAT_DTYPES:
        raise QuantOpError(f"scales must be a float tensor, got {scales.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise QuantOpError(
            f"expected qweight/qzeros/scales 2-D and g_idx 1-D, got {tuple(qweight.shape)}, "
            f"{tuple(qzeros.shape)}, {tuple(scales.shape)}, {tuple(g_idx.shape)}"
        )
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise QuantOpError(f"scales {tuple(scales.shape)} must have N={n} columns like qweight {tuple(qweight.shape)}")
    if qzeros.shape != (groups, n * bits // 32):
        raise QuantOpError(
            f"qzeros shape {tuple(qzeros.shape)} does not fit scales {tuple(scales.shape)} at {bits} bits "
            f"(expected {(groups, n * bits // 32)})"
        )
    if g_idx.shape[0] != k:
        raise QuantOpError(f"g_idx has {g_idx.shape[0]} entries, expected K={k} (from qweight {tuple(qweight.shape)})")
    return k, n, groups


def dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, dtype=None) -> torch.Tensor:
    """The full weight W^T [K, N] = scale[g] * (code - zero[g]) in `dtype` (default scales')."""
    check_layer(qweight, qzeros, scales, g_idx, bits)
    codes = unpack_qweight(qweight, bits)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, "gptq")  # [G, N], true zeros
    g = g_idx.long()
    w = scales[g].float() * (codes - zeros[g]).float()
    return w.to(dtype or scales.dtype)


def gemm_reference(x, qweight, qzeros, scales, g_idx, bits: int, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias), dequantizing the whole weight first. x: [..., K]."""
    w = dequantize_reference(qweight, qzeros, scales, g_idx, bits, dtype=x.dtype)
    y = torch.matmul(x, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def dequantize(layer: QLayer, dtype=None) -> torch.Tensor:
    """W^T [K, N] in the original input order, in `dtype` (default the scales')."""
    w = dequantize_reference(layer.qweight, layer.qzeros, layer.scales, layer.kernel_g_idx(), layer.bits, dtype)
    if layer.perm is None:
        return w
    out = torch.empty_like(w)
    out[layer.perm.long()] = w
    return out


def standard_qweight(layer: QLayer) -> torch.Tensor:
    """qweight in the checkpoint's row order (the input's own), whatever the kernel layout."""
    if layer.perm is None:
        return layer.qweight
    return repack_rows(layer.qweight, torch.argsort(layer.perm.long()), layer.bits)


def repack_rows(qweight: torch.Tensor, order: torch.Tensor, bits: int) -> torch.Tensor:
    """packing.permute_rows (row i of the result is row order[i]), on the extension's op for
    4-bit CPU tensors: a 7B layer in tens of milliseconds where torch's gathers take seconds."""
    if _ext is not None and bits == 4 and qweight.device.type == "cpu" and order.shape == (qweight.shape[0] * 8,):
        return torch.ops.bluelm_quant.permute_rows_4bit(qweight, order.to(torch.int64))
    return permute_rows(qweight, order, bits)


def _gemm_reference_layer(x: torch.Tensor, layer: QLayer) -> torch.Tensor:
    """gemm_reference for either layout (a permuted one multiplies the permuted x)."""
    if layer.perm is None:
        return gemm_reference(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)
    xp = x.index_select(-1, layer.perm)
    return gemm_reference(xp, layer.qweight, layer.qzeros, layer.scales, layer.kernel_g_idx(), layer.bits, layer.bias)


def check_activation(x: torch.Tensor, qweight: torch.Tensor, in_features: int) -> None:
    if not x.is_floating_point():
        raise QuantOpError(f"activations must be a float tensor (fp16/bf16/fp32), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise QuantOpError(
            f"activations have {x.shape[-1]} features in their last dimension, "
            f"the layer expects in_features={in_features}"
        )
    if x.device != qweight.device:
        raise QuantOpError(f"activations are on {x.device} but the quantized weights are on {qweight.device}")


# --- the compiled extension ------------------------------------------------------------


def _load_extension():
    """(module, None) or (None, why it is not usable)."""
    try:
        import quant_cuda
    except ImportError as e:  # also undefined symbols from a torch version mismatch
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(quant_cuda, "with_cuda"):
        # The source folder quant_cuda/ (no __init__.py) imports as an empty namespace package.
        where = getattr(quant_cuda, "__file__", None) or list(getattr(quant_cuda, "__path__", []))
        return None, f"`import quant_cuda` found {where}, not the compiled module"
    return quant_cuda, None


_ext, _ext_error = _load_extension()
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("bluelm_quant.ops: %s", message)


def backend() -> str:
    """What quantized matmuls run on: 'cuda+cpu kernels (...)', 'cpu-kernel (...)' or 'reference (...)'."""
    if _ext is None:
        return f"reference (extension not built: {_ext_error})"
    if _ext.with_cuda:
        return f"cuda+cpu kernels (TORCH_CUDA_ARCH_LIST {_ext.cuda_archs}; CPU {_ext.get_cpu_isa()})"
    return f"cpu-kernel ({_ext.get_cpu_isa()}; no CUDA kernels in this build)"


# Best first. amx: AVX-512 at M = 1, AMX tiles from 2 rows on (Intel Sapphire Rapids+).
CPU_ISAS = ("amx", "avx512", "avx2", "scalar")
CPU_ISA_ENV = "BLUELM_QUANT_CPU_ISA"


_cpu_isa = _ext.get_cpu_isa() if _ext is not None else None  # a plain global: gemm reads it under torch.compile


def cpu_isa() -> str | None:
    """The CPU kernel body in use ('amx', 'avx512', 'avx2' or 'scalar'); None without the extension."""
    return _cpu_isa


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels on body `name` ('amx', 'avx512', 'avx2', 'scalar' or 'best'); returns the one in use.

    For tests and speed comparisons. A body this CPU cannot run is replaced by the best one
    it can (with a warning), so a forced body never executes an unsupported instruction.
    The BLUELM_QUANT_CPU_ISA environment variable does the same at import.
    """
    if _ext is None:
        raise QuantOpError(f"set_cpu_isa({name!r}): the quant_cuda extension is not usable ({_ext_error})")
    if name not in CPU_ISAS + ("best",):
        raise QuantOpError(f"unknown CPU kernel body {name!r}: use one of {', '.join(CPU_ISAS)} or 'best'")
    global _cpu_isa
    got = _cpu_isa = _ext.set_cpu_isa(name)
    if name != "best" and got != name:
        log.warning(
            "bluelm_quant.ops: this CPU cannot run the %s kernels (it has %s): using %s",
            name, _ext.cpu_isa_detected, got,
        )
    return got


def _isa_from_environment() -> None:
    """Apply BLUELM_QUANT_CPU_ISA (run once at import)."""
    value = os.environ.get(CPU_ISA_ENV, "")
    if _ext is None or not value.strip():
        return
    try:
        set_cpu_isa(value.strip().lower())
    except QuantOpError as e:  # a typo must not stop the package from importing: say so, keep the best body
        log.warning("bluelm_quant.ops: %s=%r ignored: %s", CPU_ISA_ENV, value, e)


_isa_from_environment()


if _ext is not None:
    # Shapes for torch.compile / fake tensors; the C++ schemas point here (set_python_module).
    @torch.library.register_fake("bluelm_quant::gemm_4bit")
    def _gemm_4bit_fake(x, qweight, qzeros, scales, perm, group_size, bias):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {tuple(x.shape)}")
        torch._check(x.shape[1] == qweight.shape[0] * 8, lambda: f"x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)}")
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("bluelm_quant::dequantize_4bit")
    def _dequantize_4bit_fake(qweight, qzeros, scales, group_size, dtype=None):
        return scales.new_empty((qweight.shape[0] * 8, qweight.shape[1]), dtype=dtype or scales.dtype)

    @torch.library.register_fake("bluelm_quant::gemm_int8")
    def _gemm_int8_fake(x, weight, scale, bias):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {tuple(x.shape)}")
        torch._check(x.shape[1] == weight.shape[1], lambda: f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
        return x.new_empty((x.shape[0], weight.shape[0]))


# --- load-time preparation ------------------------------------------------------------------


def _contiguous_group_size(g_sorted: torch.Tensor, k: int, groups: int) -> int | None:
    """The group size if sorted g_idx is exactly arange(K) // gs for some gs, else None."""
    gs = int((g_sorted == 0).sum())
    if gs == 0 or -(-k // gs) != groups:
        return None
    expected = torch.arange(k, dtype=torch.int64) // gs
    return gs if torch.equal(g_sorted.to(torch.int64), expected) else None


def prepare(qweight, qzeros, scales, g_idx, bits: int, bias=None) -> QLayer:
    """The layer in the kernel's layout (built once, at load time), from the standard tensors.

    The kernels take groups as contiguous runs of rows (row r in group r // group_size).
    Act-order checkpoints keep qweight in the original input order with a permuted g_idx;
    here rows are stable-sorted by g_idx and qweight is repacked in that order (a new
    tensor: the caller drops the old one), with `perm` for the kernel to gather x. If,
    after sorting, the groups are not runs of one size (a partial last group allowed), or
    that size is not a multiple of 8, or bits != 4, the QLayer has group_size None: the
    reference path (the reason is logged once). Tensors on the meta device are returned
    as they are, without a warning (QuantLinear.post_init runs again once they are loaded).
    """
    k, n, groups = check_layer(qweight, qzeros, scales, g_idx, bits)
    layer = QLayer(qweight, qzeros, scales, g_idx, bits, bias)
    if qweight.is_meta or g_idx.is_meta:
        return layer
    if bits != 4:
        _warn_once(f"no kernel for {bits}-bit layers: they run on the reference path (dequantize + matmul)")
        return layer
    g = g_idx.detach().to("cpu", torch.int64)
    if k and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise QuantOpError(f"g_idx values lie in [{int(g.min())}, {int(g.max())}], expected [0, {groups}) for {groups} groups")
    order = torch.argsort(g, stable=True)
    gs = _contiguous_group_size(g[order], k, groups)
    if gs is None or gs % 8:
        _warn_once(
            f"a layer's g_idx (K={k}, {groups} groups) does not form contiguous groups of one size that is a "
            "multiple of 8 after sorting: it runs on the reference path"
        )
        return layer
    if torch.equal(order, torch.arange(k)):
        return layer._replace(group_size=gs)
    return layer._replace(qweight=repack_rows(qweight, order, bits),
                          perm=order.to(device=qweight.device, dtype=torch.int32), group_size=gs)


# --- dispatch --------------------------------------------------------------------------------


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_USABLE_CPUS = _usable_cpus()


_kernel_threads = 0  # set_kernel_threads' count; 0: torch.get_num_threads()


def set_kernel_threads(n: int | None) -> int:
    """Run the CPU kernels on n threads whatever torch.set_num_threads says (None or 0: follow torch,
    the default); returns the count they will use.

    Why a count of their own: at batch 1 torch's ops between the kernels (norms, RoPE, attention
    over a short cache) take microseconds, and a 2-thread OpenMP region of theirs waits a whole
    scheduler time slice for a descheduled thread on a loaded machine (an SDPA call measured
    16 ms instead of 30 us). The decode loop (generate.Generator) runs torch on one thread and the
    kernels, whose own pool does not wait for late threads, on all of them. More than the CPUs
    this process may use runs that many (with a warning).
    """
    n = int(n or 0)
    if n < 0:
        raise QuantOpError(f"set_kernel_threads({n}): use a positive thread count, or None to follow torch")
    if _ext is None:
        raise QuantOpError(f"set_kernel_threads({n}): the quant_cuda extension is not usable ({_ext_error})")
    global _kernel_threads
    _ext.set_kernel_threads(n)
    _kernel_threads = n
    _check_cpu_threads()
    return min(kernel_threads(), _USABLE_CPUS)


def kernel_threads_setting() -> int:
    """What set_kernel_threads was last given (0: the kernels follow torch.get_num_threads())."""
    return _kernel_threads


def kernel_threads() -> int:
    """The thread count the CPU kernels are asked for (before the cap at the usable CPUs)."""
    return _kernel_threads or torch.get_num_threads()


def _check_cpu_threads() -> None:
    """The CPU kernels run min(asked threads, usable CPUs) threads; say so once when capped."""
    n = kernel_threads()
    if n > _USABLE_CPUS:
        asked = f"set_kernel_threads({n})" if _kernel_threads else f"torch.get_num_threads() is {n}"
        _warn_once(
            f"{asked} but this process may run on {_USABLE_CPUS} CPUs: the 4-bit CPU "
            f"kernels use {_USABLE_CPUS} threads (torch.set_num_threads({_USABLE_CPUS}) also keeps torch's own "
            "ops from oversubscribing the cores)"
        )


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype | None, str]:
    """The dtype the kernel runs in for x, or (None, why not)."""
    if _ext is None:
        return None, f"the quant_cuda extension is not usable ({_ext_error}); all quantized matmuls use the reference path"
    if x.device.type == "cpu":
        if not torch.compiler.is_compiling():  # torch.get_num_threads() would break the graph
            _check_cpu_threads()
        if x.dtype in (torch.float32, torch.bfloat16):
            return x.dtype, ""
        if x.dtype == torch.float16:
            return torch.float32, ""  # no fp16 CPU kernel; fp32 is exact for fp16 inputs
    elif x.device.type == "cuda":
        if not _ext.with_cuda:
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
    return CPU_AMX_DEQUANT_MIN_M if _cpu_isa == "amx" else CPU_DEQUANT_MIN_M


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
        w = torch.ops.bluelm_quant.dequantize_4bit(layer.qweight, layer.qzeros, s, layer.group_size, mm_dtype)
        xp = (x2 if layer.perm is None else x2.index_select(1, layer.perm)).to(mm_dtype)
        y = torch.matmul(xp, w) if b is None else torch.addmm(b.to(mm_dtype), xp, w)
    else:
        y = torch.ops.bluelm_quant.gemm_4bit(x2, layer.qweight, layer.qzeros, s, layer.perm, layer.group_size, b)
    fault = kernel_check.STATE.fault
    return y if fault is None else fault(y)


def _self_check(layer: QLayer, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Every M-path of this configuration on the layer's first CHECK_COLUMNS output columns:
    {path: (max |kernel - reference|, max |reference|)}."""
    n = min(layer.qweight.shape[1], kernel_check.CHECK_COLUMNS)
    cols = n * layer.bits // 32
    part = layer._replace(qweight=layer.qweight[:, :n].contiguous(), qzeros=layer.qzeros[:, :cols].contiguous(),
                          scales=layer.scales[:, :n].contiguous(),
                          bias=None if layer.bias is None else layer.bias[:n].contiguous())
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
    return (device, dtype, layer.bits, layer.group_size, layer.perm is not None, layer.in_features,
            _cpu_isa if device.type == "cpu" else None)


def gemm(x: torch.Tensor, layer: QLayer) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K]; output in x's dtype. `layer` as `prepare` made it."""
    k = layer.in_features
    check_activation(x, layer.qweight, k)
    if layer.group_size is None or (x.requires_grad and torch.is_grad_enabled()):
        return _gemm_reference_layer(x, layer)
    dtype, why = _compute_dtype(x)
    if dtype is None:
        _warn_once(why)
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
    qweight: torch.Tensor
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
    if layer.group_size is None or _ext is None or torch.compiler.is_compiling():
        return None
    dtype, _ = _compute_dtype(x)
    if dtype is None or dtype != x.dtype or layer.scales.dtype != dtype:
        return None
    if layer.bias is not None and layer.bias.dtype != dtype:
        return None
    cpu_isa = _cpu_isa if x.device.type == "cpu" else None
    key = _config_key(layer, x.device, dtype)
    state = kernel_check.STATE
    max_rows = _dequant_min_m(x.device)
    paths = {_path(m, x.device) for m in kernel_check.REPRESENTATIVE_M if m < max_rows}
    if state.enabled and any(state.verdicts.get((key, p), "unchecked") is not None for p in paths):
        return None
    return GemmPlan(x.device, dtype, layer.qweight, layer.qzeros, layer.scales, layer.perm, layer.group_size,
                    layer.bias, layer.in_features, layer.qweight.shape[1], max_rows, cpu_isa, state.epoch)


def plan_applies(plan: GemmPlan, x: torch.Tensor) -> bool:
    """Whether run_plan(plan, x) gives what gemm(x, layer) would (cheap: attribute compares only)."""
    state = kernel_check.STATE
    return (
        x.dtype == plan.dtype
        and x.device == plan.device
        and x.shape[-1] == plan.in_features
        and x.numel() < plan.max_rows * plan.in_features
        and not (x.requires_grad and torch.is_grad_enabled())
        and plan.cpu_isa == (_cpu_isa if plan.device.type == "cpu" else None)
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
    qweight = layer.qweight[:, start:stop].contiguous()
    qzeros = layer.qzeros[:, start * bits // 32 : stop * bits // 32].contiguous()
    scales = layer.scales[:, start:stop].contiguous()
    if _dequantize_kernel_ok(layer, dtype):
        return torch.ops.bluelm_quant.dequantize_4bit(qweight, qzeros, scales.to(dtype), layer.group_size, dtype)
    return dequantize_reference(qweight, qzeros, scales, layer.kernel_g_idx(), bits, dtype)


def _dequantize_kernel_ok(layer: QLayer, dtype: torch.dtype) -> bool:
    device = layer.qweight.device
    if _ext is None or layer.group_size is None or layer.bits != 4:
        return False
    if device.type == "cpu":
        supported = (torch.float32, torch.bfloat16)
    elif device.type == "cuda" and _ext.with_cuda:
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
    qweight, qzeros = layer.qweight[:, :n].contiguous(), layer.qzeros[:, : n * layer.bits // 32].contiguous()
    scales = layer.scales[:, :n].to(dtype).contiguous()
    ref = dequantize_reference(qweight, qzeros, scales.float(), layer.kernel_g_idx(), layer.bits, torch.float32)
    got = torch.ops.bluelm_quant.dequantize_4bit(qweight, qzeros, scales, layer.group_size, dtype).float()
    return {"dequantize": (float((got - ref).abs().max()), float(ref.abs().max()))}


# --- int8 weights (the quantized lm_head) -------------------------------------------------------

# From this many activation rows on, placement.Int8Linear dequantizes chunks of rows and calls
# torch.matmul instead of the int8 kernel. SmolLM2's 49152x576 head, load ~10, best of 5 ms,
# int8 kernel / chunked: 1 thread M=1 7.3/134, M=16 33/106, M=64 71/133, M=128 202/155;
# 2 threads M=64 130/299, M=128 269/404.
CPU_INT8_DEQUANT_MIN_M = 128


def int8_kernel_runs(x: torch.Tensor) -> bool:
    """Whether `gemm_int8` has a kernel for activations x (else the caller's own matmul path)."""
    return (
        _ext is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.numel() < CPU_INT8_DEQUANT_MIN_M * x.shape[-1]
    )


def gemm_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x @ (scale[:, None] * weight).T (+ bias) on the CPU kernel, in x's dtype.

    x [..., K] float32/bfloat16/float16 (float16 computed in float32); weight int8 [N, K]
    (nn.Linear's layout); scale [N] and bias [N] any float dtype. Check `int8_kernel_runs(x)`
    first: this raises QuantOpError where there is no kernel.
    """
    if not int8_kernel_runs(x):
        why = _ext_error if _ext is None else f"{x.dtype} on {x.device}, {x.numel() // max(x.shape[-1], 1)} rows"
        raise QuantOpError(f"gemm_int8: no int8 kernel for these activations ({why}); check ops.int8_kernel_runs(x)")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise QuantOpError(f"gemm_int8: weight must be a 2-D int8 tensor [N, K], got {weight.dtype} {tuple(weight.shape)}")
    check_activation(x, weight, weight.shape[1])
    dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    _check_cpu_threads()
    y = torch.ops.bluelm_quant.gemm_int8(
        x.reshape(-1, weight.shape[1]).to(dtype), weight, scale.to(dtype), None if bias is None else bias.to(dtype)
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


__all__ = [
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
    "prepare",
    "run_plan",
    "kernel_threads",
    "kernel_threads_setting",
    "set_cpu_isa",
    "set_kernel_threads",
    "standard_qweight",
]
