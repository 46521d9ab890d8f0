"""The compiled quant_cuda module, loaded once: the module, or why it is not usable.

Below ops, cpu_settings and qlayer, which all call into the extension, so that each of them
reads the one handle here (`quant_cuda()`, `load_error()`) and none imports another for it.
The gateway's error (`QuantOpError`) and its one-time warnings (`warn_once`) live here for the
same reason. The ops' fake implementations for torch.compile stay in ops.py: the extension
names that module (`m.set_python_module("bluelm_quant.ops")`) and torch checks it.
"""
from __future__ import annotations

import logging

# The gateway's one logger; its name predates the split of ops.py (users filter on it).
log = logging.getLogger("bluelm_quant.ops")
_warned: set[str] = set()


class QuantOpError(ValueError):
    """Inputs to a quantized op do not fit together."""


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time it comes (every fallback is said once)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("bluelm_quant.ops: %s", message)


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


def quant_cuda():
    """The compiled quant_cuda module; None where it is not usable (`load_error()` says why)."""
    return _ext


def load_error() -> str | None:
    """Why quant_cuda is not usable; None when it is."""
    return _ext_error


__all__ = ["QuantOpError", "load_error", "log", "quant_cuda", "warn_once"]
