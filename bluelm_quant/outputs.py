"""What a tool that writes a model directory may replace, and one error when it may not.

Deleting is where a tool loses a user's data, so nothing is deleted that bluelm-quant did
not write: an output that is, is inside, or contains the source model is refused outright
(replacing it would delete the source; writing into it would change it), and `--overwrite`
replaces only an empty directory or a quantized checkpoint. A failed write (read-only
directory, disk full) is one OutputError saying what to do. Used by quantization
(workdir.py, lock.py) and conversion (convert.py).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

from safetensors import SafetensorError

# A checkpoint --overwrite may replace: what saving.write_configs writes first.
CHECKPOINT_MARKER = "quantize_config.json"


class OutputError(RuntimeError):
    """The output cannot be written or replaced: it holds the source model or files this
    tool did not write, or the file system refused a write."""


def check_not_source(source: str, *outputs: str) -> None:
    """Refuse outputs that are, are inside, or contain the source model directory."""
    src = os.path.realpath(source)
    for out in outputs:
        real = os.path.realpath(out)
        if src == real or src.startswith(real + os.sep):
            relation, harm = ("is" if src == real else "contains"), "delete"
        elif real.startswith(src + os.sep):
            relation, harm = "is inside", "change"
        else:
            continue
        raise OutputError(
            f"the output {out} {relation} the source model {source}; writing there would {harm} it. "
            "Choose an --out outside the source model's directory"
        )


def check_replaceable(out: str) -> None:
    """--overwrite replaces an empty directory or a quantized checkpoint, nothing else."""
    out = os.path.abspath(out)
    if not os.path.isdir(out) or os.path.islink(out):
        raise OutputError(f"--out {out} exists and is not a directory; --overwrite replaces only a checkpoint "
                          "directory. Remove it yourself if you mean to, or choose another --out")
    entries = os.listdir(out)
    subdirs = sorted(e for e in entries if os.path.isdir(os.path.join(out, e)))
    if entries and (CHECKPOINT_MARKER not in entries or subdirs):
        why = f"it has subdirectories ({', '.join(subdirs[:3])})" if subdirs else f"it has no {CHECKPOINT_MARKER}"
        raise OutputError(
            f"--out {out} exists and does not look like a quantized checkpoint ({why}); --overwrite replaces "
            "only those, so nothing was deleted. Remove it yourself if you mean to, or choose another --out"
        )


def write_failure(e: BaseException, path: str) -> str:
    """One line for a failed write of a quantization run under `path`: what happened and what to do."""
    text = str(e)
    no_space = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
        or "StorageFull" in text
    if no_space:
        return (f"no space left on the device holding {path} ({text}); free some space, then run the same "
                "command with --resume: the finished layers are kept")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {e.filename or path}: {e.strerror}; choose an --out in a directory you can write to "
                "(or fix its permissions)")
    where = getattr(e, "filename", None) or path
    return f"cannot write {where}: {getattr(e, 'strerror', None) or text}"


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a failed write (OSError, safetensors' SafetensorError) under `path` into an OutputError."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise OutputError(write_failure(e, path)) from e


__all__ = ["CHECKPOINT_MARKER", "OutputError", "check_not_source", "check_replaceable", "write_failure", "writing"]
