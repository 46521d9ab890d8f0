"""An exclusive lock on a quantization output, held for a whole run.

Two runs writing one `--out` at once would interleave their layer files and publish a
checkpoint mixed from both. The lock is `<out>.lock`, beside the output, locked with
flock(2): the kernel drops it when its holder exits, however it exits (kill -9 included),
so a lock left behind is never mistaken for a live run. The file records who holds it
(pid, host, start time, command), for the message a second run gets, and for the note a
run prints when it takes over the file of a run that was killed.

Within one process the lock is re-entrant: `quantize()` takes it before tokenizing and
`quantize_model()` again around the layer loop.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Iterator

from .atomic import file_mode
from .outputs import writing

log = logging.getLogger(__name__)

_held: dict[str, int] = {}  # lock path -> nesting depth, in this process


class OutputLockError(RuntimeError):
    """Another run is writing the same output."""


def lock_path(out_dir: str) -> str:
    return os.path.abspath(out_dir) + ".lock"


@contextlib.contextmanager
def output_lock(out_dir: str) -> Iterator[str]:
    """Hold `<out_dir>.lock` for the duration of the block; yields the lock file's path.

    Raises OutputLockError at once (no waiting) when another live process holds it.
    """
    path = lock_path(out_dir)
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    fd = _acquire(path)
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        if fd is not None:
            _release(path, fd)


def _acquire(path: str) -> int | None:
    with writing(path):  # a read-only or full directory: one OutputError
        os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            out = path[: -len(".lock")]
            raise OutputLockError(
                f"{out} is being written by another run ({holder}); wait for it to finish or stop it, "
                "or choose another --out"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("cannot lock %s (%s): this file system has no locks; make sure no other run writes "
                        "the same output", path, e.strerror)
            return None
        # A holder that finished between our open() and flock() has unlinked the file we
        # locked; lock the file now at `path` instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read(fd)
    if previous.get("pid") not in (None, os.getpid()):
        log.warning("taking over %s from a run that ended without releasing it (killed?): %s", path,
                    _describe(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    try:
        with writing(path):
            os.fchmod(fd, file_mode())
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except BaseException:
        _release(path, fd)
        raise
    return fd


def _release(path: str, fd: int) -> None:
    # Unlinked while still locked: a run waiting on this inode re-checks and locks the new file.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "a process that has not recorded itself yet"
    where = f" on {record['host']}" if record.get("host") and record["host"] != socket.gethostname() else ""
    since = f", started {record['started']}" if record.get("started") else ""
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record['pid']}{where}{since}{command}"


__all__ = ["OutputLockError", "lock_path", "output_lock"]
