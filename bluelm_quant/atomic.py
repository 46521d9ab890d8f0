"""Write files and directories so that a crash never leaves something that looks complete.

Temporary names come from tempfile, which creates owner-only entries (files 0600,
directories 0700); what is renamed into place gets the mode a plain open() or mkdir()
would have given it under the process umask (typically 0644 / 0755), so a server running
as another user can read a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open(path, "w") gives a new file."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode os.mkdir gives a new directory."""
    return 0o777 & ~umask()


def follow_umask(path: str) -> None:
    """Give a file written by a library that creates it owner-only (safetensors' save_file
    writes 0600) the mode a plain open() would have given it."""
    os.chmod(path, file_mode())


def write_json(path: str, obj) -> None:
    """Write JSON to a temporary sibling, fsync, rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool = False):
    """Yield a temporary directory next to `final`; on success rename it into place.

    If the block raises (or the process dies), `final` is untouched and the temporary
    directory is removed (or left with a `.tmp-` prefix that no loader reads).
    """
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output directory or pass overwrite")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would hide the checkpoint from other users
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(final)}-", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
