"""The kernels check themselves the first time a configuration runs on a device.

A configuration is what selects kernel code: device, compute dtype, bits, group size,
act-order, in_features, and the M-path (which row-block variant the launcher picks for
M = 1, 2, 3-4, 5-8, 9-16, 17+ rows, or dequantize + matmul past ops' threshold). The
first time a layer of a new configuration runs (whatever its M), ops.gemm runs every
M-path of it on that layer's own tensors restricted to CHECK_COLUMNS output
columns, with seeded random activations, and compares with the reference path
(dequantize, then matmul, in float32 on the same rounded inputs). Milliseconds, once.

A mismatch logs one warning (which configuration, by how much, how to report it), and
that configuration runs on the reference path from then on: slower, never wrong.

On by default; `set_enabled(False)` or BLUELM_QUANT_SELF_CHECK=0 turns it off. Under
torch.compile nothing is checked (a graph cannot branch on a measured error): configurations
first met inside a compiled region run unchecked, so warm a model up eagerly first (the
Generator's prefill does). `report()` lists every verdict (tools/gpu_check.py prints it).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

ENV = "BLUELM_QUANT_SELF_CHECK"
# The launchers' row-block variants (quant_cuda/gemm_4bit.cu, cpu_kernels*.cpp) fall into these
# classes; each is checked with an awkward row count of its own (partial tiles: the CPU's AMX
# body takes up to 5 rows per tile, CUDA's MMA kernels 8 or 16).
M_CLASSES = (1, 2, 4, 8, 16, 32)
REPRESENTATIVE_M = (1, 2, 3, 7, 13, 29)
MAX_CHECK_M = 4096  # a dequantize + matmul threshold above this means that path never runs
CHECK_COLUMNS = 64
# Largest |kernel - reference| allowed, as a share of max |reference|. Both see the same
# rounded inputs, so what is left is summation order and the output's rounding.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
REPORT_HOW = ("please report it at the project's issue tracker with the output of `python tools/gpu_check.py` "
              "(or of bluelm_quant.ops.backend() and bluelm_quant.kernel_check.report())")


def m_class(m: int) -> int:
    """The smallest class of M_CLASSES that holds m rows (the last one for more)."""
    return next((c for c in M_CLASSES if m <= c), M_CLASSES[-1])


def describe(key: tuple, path: str) -> str:
    """A configuration key (device, dtype, bits, group size, act-order, column blocks, in_features, CPU
    body) in words."""
    device, dtype, bits, group_size, act_order, blocks, k, cpu_body = key
    order = (", act-order" if act_order else "") + (", column blocks" if blocks else "")
    body = f" ({cpu_body} body)" if cpu_body else ""
    return (f"{device}{body} {str(dtype).replace('torch.', '')}, {bits}-bit, group size {group_size}{order}, "
            f"in_features={k}, {path}")


_UNSEEN = object()


class SelfCheck:
    def __init__(self):
        self.enabled = os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")
        self.verdicts: dict[tuple, str | None] = {}  # (key, path) -> None when the kernel agrees, else why not
        # Test-only: applied to every kernel output, so tests can plant a wrong kernel.
        self.fault: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Bumped when verdicts are forgotten or checking is switched: ops.GemmPlan made under an
        # older epoch goes back through the checked path.
        self.epoch = 0

    def path_ok(self, key: tuple, path: str, check_all: Callable[[], dict[str, tuple[float, float]]]) -> bool:
        """Whether `path` of configuration `key` may run the kernel; checks every path of the
        configuration the first time one is met (a plain dict lookup afterwards).

        check_all() -> {path: (max abs error, max abs reference)} for every M-path.
        """
        verdict = self.verdicts.get((key, path), _UNSEEN)
        if verdict is not _UNSEEN:
            return verdict is None
        if not self.enabled or torch.compiler.is_compiling():
            return True
        for p, (err, scale) in check_all().items():
            self.verdicts[(key, p)] = self._judge(key, p, err, scale)
        return self.verdicts.get((key, path)) is None

    def _judge(self, key: tuple, path: str, err: float, scale: float) -> str | None:
        tol = TOLERANCE.get(key[1], 2e-2)
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        if rel <= tol:  # NaN compares False: a NaN output is a mismatch
            return None
        why = f"max abs error {err:.3g} = {rel:.2%} of the output scale {scale:.3g} (tolerance {tol:.2%})"
        log.warning(
            "bluelm_quant: the quant_cuda kernel for %s disagrees with the reference path: %s. That configuration "
            "now runs on the reference path (dequantize + matmul: correct, slower); %s",
            describe(key, path), why, REPORT_HOW,
        )
        return why

    def report(self) -> list[dict]:
        return [{"config": describe(k, p), "ok": v is None, "detail": v or ""} for (k, p), v in self.verdicts.items()]

    def reset(self) -> None:
        self.verdicts.clear()
        self.epoch += 1


STATE = SelfCheck()


def set_enabled(enabled: bool) -> None:
    """Turn the first-use self-check on or off for this process (default on; env BLUELM_QUANT_SELF_CHECK=0: off)."""
    STATE.enabled = bool(enabled)
    STATE.epoch += 1


def report() -> list[dict]:
    """Every configuration checked so far: {"config", "ok", "detail"}."""
    return STATE.report()


__all__ = ["CHECK_COLUMNS", "M_CLASSES", "STATE", "describe", "m_class", "report", "set_enabled"]
