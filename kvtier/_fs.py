"""The one atomic file write: a reader sees the old file or the whole new one, never a part.

Every file kvtier writes for others to read goes through here: disk-tier chunks, pin records,
the cost model, the start-up calibration, the connector's stats file.

How: the bytes go into a temp file ``.tmp.<pid>.<random>`` in the target's own directory (same
file system, so the rename is atomic), created exclusively and never through a symlink
(``O_EXCL | O_NOFOLLOW``), ``flock``'ed for its whole life (a sweeper -- the disk tier's open,
``kvtier.tiers.disk`` -- tells a live writer's temp file from a crashed one's by that lock),
given its mode with ``fchmod`` (the umask can neither narrow nor widen it), written,
``fsync``'ed, and ``os.replace``'d onto the name.  On any failure the temp file is removed.

Crash guarantees.  ``fsync=True``: once the call returns, the new bytes survive a power loss
(``atomic_write`` also fsyncs the directory, which makes the rename itself durable;
``replace_in_dir`` leaves that to its caller, which may write many files into one directory and
sync it once).  ``fsync=False``: a running system's readers still never see a partial file, but
after a power loss the name may hold the old file, the new one, or on some file systems an empty
one: for files rewritten all the time whose loss costs nothing (the stats file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

TMP_PREFIX = ".tmp."  # temp files are ``.tmp.<pid>.<16 hex>``: the pid tells a sweeper whose it was

Data = bytes | memoryview | Sequence[bytes | memoryview]  # one buffer, or several written back to back


def _tmp_name() -> str:
    return f"{TMP_PREFIX}{os.getpid()}.{secrets.token_hex(8)}"


def create_locked(dir_fd: int, mode: int | None) -> tuple[int, str]:
    """A new temp file in ``dir_fd``, open for writing and ``flock``'ed; returns (fd, name).

    ``mode`` None: ``0666`` less the umask, as ``open`` would (files the user names: stats,
    cost model); otherwise exactly ``mode``."""
    name = _tmp_name()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666 if mode is None else mode, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if mode is not None:
            os.fchmod(fd, mode)  # the umask narrowed (or widened) the mode given to open
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    return fd, name


def _write_all(fd: int, data: Data) -> None:
    buffers = [memoryview(data)] if isinstance(data, bytes | memoryview) else [memoryview(b) for b in data]
    buffers = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers]
    while buffers:
        written = os.writev(fd, buffers)
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers.pop(0)
        if buffers and written:
            buffers[0] = buffers[0][written:]


def replace_in_dir(dir_fd: int, name: str, data: Data, *, mode: int | None, fsync: bool) -> None:
    """Atomically replace ``name`` in directory ``dir_fd`` with ``data`` (module docstring).

    The directory itself is not fsynced: a caller that needs the rename durable does that."""
    fd, tmp = create_locked(dir_fd, mode)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)  # after the rename: the lock covers the temp file's whole life


def atomic_write(path: str | os.PathLike[str], data: Data, *, fsync: bool = True, mode: int | None = None) -> None:
    """Atomically replace the file at ``path`` with ``data``; with ``fsync`` durably (file and
    directory).  ``mode`` None: ``0666`` less the umask.  OSError when it cannot."""
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_in_dir(dir_fd, path.name, data, mode=mode, fsync=fsync)
        if fsync:  # make the rename itself durable
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
