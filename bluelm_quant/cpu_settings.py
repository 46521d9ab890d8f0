"""The CPU kernels' process-wide settings: which body runs (`cpu_isa`) and on how many threads.

The CPU kernels run the best body the CPU has (`cpu_isa()`: amx, avx512, avx2, scalar);
`set_cpu_isa` or BLUELM_QUANT_CPU_ISA pick a lower one, on as many threads as
torch.get_num_threads() (at most the CPUs this process may use), or `set_kernel_threads`' count.

Apart from ops.py because these are the extension's global state, set by callers that never run
a matmul themselves (generate.decode_threads, the benchmarks); ops reads them per call
(`cpu_isa()` selects the dequantize threshold and the self-check's configuration).
"""
from __future__ import annotations

import os

import torch

from . import extension
from .extension import QuantOpError, log, warn_once

# Best first. amx: AVX-512 at M = 1, AMX tiles from 2 rows on (Intel Sapphire Rapids+).
CPU_ISAS = ("amx", "avx512", "avx2", "scalar")
CPU_ISA_ENV = "BLUELM_QUANT_CPU_ISA"


# A plain global: gemm reads it (through cpu_isa()) under torch.compile.
_cpu_isa = None if extension.quant_cuda() is None else extension.quant_cuda().get_cpu_isa()


def cpu_isa() -> str | None:
    """The CPU kernel body in use ('amx', 'avx512', 'avx2' or 'scalar'); None without the extension."""
    return _cpu_isa


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels on body `name` ('amx', 'avx512', 'avx2', 'scalar' or 'best'); returns the one in use.

    For tests and speed comparisons. A body this CPU cannot run is replaced by the best one
    it can (with a warning), so a forced body never executes an unsupported instruction.
    The BLUELM_QUANT_CPU_ISA environment variable does the same at import.
    """
    ext = extension.quant_cuda()
    if ext is None:
        raise QuantOpError(f"set_cpu_isa({name!r}): the quant_cuda extension is not usable ({extension.load_error()})")
    if name not in CPU_ISAS + ("best",):
        raise QuantOpError(f"unknown CPU kernel body {name!r}: use one of {', '.join(CPU_ISAS)} or 'best'")
    global _cpu_isa
    got = _cpu_isa = ext.set_cpu_isa(name)
    if name != "best" and got != name:
        log.warning(
            "bluelm_quant.ops: this CPU cannot run the %s kernels (it has %s): using %s",
            name, ext.cpu_isa_detected, got,
        )
    return got


def _isa_from_environment() -> None:
    """Apply BLUELM_QUANT_CPU_ISA (run once at import)."""
    value = os.environ.get(CPU_ISA_ENV, "")
    if extension.quant_cuda() is None or not value.strip():
        return
    try:
        set_cpu_isa(value.strip().lower())
    except QuantOpError as e:  # a typo must not stop the package from importing: say so, keep the best body
        log.warning("bluelm_quant.ops: %s=%r ignored: %s", CPU_ISA_ENV, value, e)


_isa_from_environment()


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
    ext = extension.quant_cuda()
    if ext is None:
        raise QuantOpError(f"set_kernel_threads({n}): the quant_cuda extension is not usable ({extension.load_error()})")
    global _kernel_threads
    ext.set_kernel_threads(n)
    _kernel_threads = n
    check_cpu_threads()
    return min(kernel_threads(), _USABLE_CPUS)


def kernel_threads_setting() -> int:
    """What set_kernel_threads was last given (0: the kernels follow torch.get_num_threads())."""
    return _kernel_threads


def kernel_threads() -> int:
    """The thread count the CPU kernels are asked for (before the cap at the usable CPUs)."""
    return _kernel_threads or torch.get_num_threads()


def check_cpu_threads() -> None:
    """The CPU kernels run min(asked threads, usable CPUs) threads; say so once when capped."""
    n = kernel_threads()
    if n > _USABLE_CPUS:
        asked = f"set_kernel_threads({n})" if _kernel_threads else f"torch.get_num_threads() is {n}"
        warn_once(
            f"{asked} but this process may run on {_USABLE_CPUS} CPUs: the 4-bit CPU "
            f"kernels use {_USABLE_CPUS} threads (torch.set_num_threads({_USABLE_CPUS}) also keeps torch's own "
            "ops from oversubscribing the cores)"
        )


__all__ = ["CPU_ISAS", "CPU_ISA_ENV", "check_cpu_threads", "cpu_isa", "kernel_threads", "kernel_threads_setting",
           "set_cpu_isa", "set_kernel_threads"]
