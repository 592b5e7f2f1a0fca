"""The disk tier's files, under a root nobody trusts: paths, modes, safe opens, stray temp files.

Path: ``<root>/<layout fingerprint hex>/<key[0:2]>/<key[2:4]>/<key hex>.kvc`` (``chunk_path``):
one subtree per layout (so models can share a root without seeing each other's files), two
levels of 256-way hex fan-out so no directory grows huge; pin records in ``<layout>/pins``.

Hostile roots: nothing under the layout subtree is trusted.  Paths are walked one directory at
a time from a descriptor of the layout subtree, never through a symlink (``open_dir``:
``O_NOFOLLOW``), and only regular files are read (``open_regular``: ``O_NONBLOCK`` + ``fstat``:
a FIFO, device or directory at a chunk or pin path is a miss, never a hang).  Files are created
``0600`` and directories ``0700`` whatever the umask (``mode="group"``: ``0640`` / ``02770``, for
processes of one group sharing a root); a root that others may write to is logged once, at
WARNING (``make_root``).

Stray temp files (``remove_stray``): a temp file of ``kvtier._fs``'s atomic write is a stray
when nobody holds its ``flock`` and its writer's pid is gone or it is older than ``STRAY_AGE_S``
(the pid alone is not trusted: PID 1 of a restarted container is the same pid; the age covers
the instant between creating a temp file and locking it).

Surveys (``subdirs``, ``layout_dirs``, ``survey_dir``) walk only the known shape of a layout
subtree, real directories only, one level at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout

# The tier's logger: what is said about a disk root stays under one name, ``kvtier.tiers.disk``.
log = logging.getLogger("kvtier.tiers.disk")

SUFFIX = ".kvc"
STRAY_AGE_S = 2.0  # an unlocked temp file this old is a stray even if a process of its pid runs
_HEX = frozenset("0123456789abcdef")

DiskMode = Literal["private", "group"]
# (file mode, directory mode): private to the user, or shared with the root's group (setgid
# directories, so every file gets that group); applied with fchmod, so the umask cannot narrow
# nor widen them.
MODES: dict[str, tuple[int, int]] = {"private": (0o600, 0o700), "group": (0o640, 0o2770)}

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFileError(OSError):
    """A FIFO, device, socket or directory where a chunk or pin record belongs: never read."""


def open_regular(name: str | Path, dir_fd: int | None = None) -> int:
    """A read-only descriptor of the regular file ``name``; never a symlink (``ELOOP``), never a
    FIFO or device (``O_NONBLOCK``: opening one cannot hang; ``NotRegularFileError``)."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, f"not a regular file: {name}")
    return fd


def open_dir(name: str, dir_fd: int, *, create_mode: int | None = None) -> int:
    """A descriptor of the real directory ``name`` in ``dir_fd`` (a symlink there is ``ELOOP`` or
    ``ENOTDIR``); ``create_mode``: create it first if missing, with exactly that mode."""
    if create_mode is not None:
        try:
            os.mkdir(name, create_mode, dir_fd=dir_fd)
        except FileExistsError:
            pass
        else:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            with contextlib.suppress(OSError):  # not the owner: keep what it has
                os.fchmod(fd, create_mode)
            return fd
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def read_small(name: str, dir_fd: int, limit: int = 256) -> bytes:
    fd = open_regular(name, dir_fd)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def layout_root(path: str | os.PathLike[str], layout: KVLayout) -> Path:
    """One layout's subtree of a disk tier's root: ``<path>/<layout fingerprint hex>``."""
    return Path(path) / f"{layout.fingerprint:016x}"


def chunk_path(layout_root: Path, key: ChunkKey) -> Path:
    """Where chunk ``key`` lives under one layout's subtree (``<root>/<layout fp hex>``)."""
    h = key.hex()
    return layout_root / h[:2] / h[2:4] / (h + SUFFIX)


def remove_stray(dir_fd: int, name: str) -> int:
    """Remove temp file ``name`` if its writer is gone; returns the bytes of a stray that stays.

    Its writer holds an ``flock`` while it writes, so a temp file whose lock we get has none.
    The lock is taken just after the file is created: one younger than ``STRAY_AGE_S`` whose
    pid runs may be in that instant, and stays (the next open removes it).
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return 0  # gone, or a symlink: not ours
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # a live writer holds it
        try:
            pid = int(name.split(".")[2])
        except (IndexError, ValueError):
            pid = -1
        if pid > 0 and _pid_alive(pid) and time.time() - st.st_mtime < STRAY_AGE_S:
            return st.st_size
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return 0
        except OSError:
            return st.st_size
        return 0
    finally:
        os.close(fd)  # releases the lock


def subdirs(dir_fd: int) -> list[str]:
    """Names of the real (not symlinked) fan-out directories ``[0-9a-f]{2}`` in ``dir_fd``."""
    with os.scandir(dir_fd) as entries:
        return [e.name for e in entries if len(e.name) == 2 and set(e.name) <= _HEX
                and e.is_dir(follow_symlinks=False)]


def survey_dir(dir_fd: int, chunks: set[ChunkKey] | None) -> int:
    """Bytes of the regular files in ``dir_fd`` (symlinks and the like are skipped); with
    ``chunks``, chunk files are added to it by name instead (no ``stat``: a survey of a big
    root is mostly these)."""
    other = 0
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            name = entry.name
            if chunks is not None and name.endswith(SUFFIX) and len(name) == 2 * KEY_BYTES + len(SUFFIX):
                with contextlib.suppress(ValueError):
                    if entry.is_file(follow_symlinks=False):
                        chunks.add(ChunkKey(bytes.fromhex(name[:-len(SUFFIX)])))
                    continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    other += entry.stat(follow_symlinks=False).st_size
    return other


def layout_dirs(layout_fd: int) -> Iterator[int]:
    """Descriptors of the places files live in one layout subtree: ``pins`` and every
    ``<2 hex>/<2 hex>`` fan-out directory (real directories only; closed after each step)."""
    places: list[tuple[int, str]] = [(layout_fd, "pins")]
    places += [(layout_fd, d1) for d1 in subdirs(layout_fd)]
    for parent, name in places:
        try:
            fd = open_dir(name, parent)
        except OSError:
            continue
        try:
            if name == "pins":
                yield fd
                continue
            for d2 in subdirs(fd):
                with contextlib.suppress(OSError):
                    fd2 = open_dir(d2, fd)
                    try:
                        yield fd2
                    finally:
                        os.close(fd2)
        finally:
            os.close(fd)


def make_root(path: str | os.PathLike[str], dir_mode: int) -> int:
    """Create the root (``dir_mode`` for what is created), warn once if others may write to it,
    and return a descriptor of it.  The root itself may be a symlink: the operator named it."""
    root = Path(path)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True, mode=dir_mode)
        with contextlib.suppress(OSError):
            os.chmod(root, dir_mode)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    loose = stat.S_IWOTH if dir_mode & stat.S_IWGRP else stat.S_IWGRP | stat.S_IWOTH
    if mode & loose:
        log.warning("disk root %s is %s-writable (mode %o): other users can plant, read or delete "
                    "its chunks; chmod %o %s", root, "world" if mode & stat.S_IWOTH else "group",
                    stat.S_IMODE(mode), dir_mode & 0o777, root)
    return fd
