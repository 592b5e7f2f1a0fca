"""G3: local disk (NVMe), one file per chunk.

Path: ``<root>/<layout fingerprint hex>/<key[0:2]>/<key[2:4]>/<key hex>.kvc``: one subtree per
layout (so models can share a root without seeing each other's files), two levels of 256-way
hex fan-out so no directory grows huge.  Bytes: the chunk format of ``kvtier.codec`` (64-byte
header with checksums, then the payload).

Crash safety: a put writes ``.tmp.<pid>.<random>`` in the chunk's directory, holding an
``flock`` on it while it writes, fsyncs it, and ``os.replace``s it onto the final name (atomic
on POSIX), then fsyncs the directory (``kvtier._fs.replace_in_dir``, kvtier's one atomic write).
A crash leaves either the old state or the whole new file, plus at worst a temp file that the
next open removes: one nobody holds the lock of, whose writer's pid is gone or that is older
than ``STRAY_AGE_S`` (the pid alone is not trusted: PID 1 of a restarted container is the same
pid; the age covers the instant between creating a temp file and locking it). A stray that stays
(too young, or not ours to remove) takes room: it is subtracted from ``capacity_bytes``. A torn
or bit-rotted file fails its checksum on read: it is deleted, counted, and reported as a miss.

Hostile roots: nothing under the layout subtree is trusted.  Paths are walked one directory at
a time from a descriptor of the layout subtree, never through a symlink (``O_NOFOLLOW``), and
only regular files are read (``O_NONBLOCK`` + ``fstat``: a FIFO, device or directory at a chunk
or pin path is a miss, never a hang).  Files are created ``0600`` and directories ``0700``
whatever the umask (``mode="group"``: ``0640`` / ``02770``, for processes of one group sharing
a root); a root that others may write to is logged once, at WARNING.

Sharing: several processes on one node may use one root.  Same key means same bytes, so two
writers racing on a key are harmless (last rename wins).  Each process indexes what it wrote or
found at open; a key another process wrote later is found by ``contains`` (one ``stat``), and a
file another process evicted turns into a miss.  Capacity bounds the **root**: in a hierarchy
the index owns it and, every ``survey_s``, re-reads the root (``survey``: this layout's chunk
names, the bytes of everything else), adopts what other processes wrote and leaves room for the
rest (``Mover.survey_disk``).  This tier alone checks only the files it wrote or found
at open.

I/O runs on a thread pool (``io_threads``): batch gets and puts proceed in parallel, and file
reads (which release the GIL) overlap checksum work on another core.

Persistent pins (token warehousing): ``<root>/<layout fp>/pins/<key hex>.pin`` marks a chunk that
no process sharing the root may evict, across restarts (``PinFiles``).  One small text file per
pinned chunk, so another process checks a candidate victim by opening one small file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from kvtier._fs import TMP_PREFIX, replace_in_dir
from kvtier.codec import HEADER_BYTES, decode_header, encode_header
from kvtier.errors import ChunkFormatError, CorruptChunkError, LayoutError, TierError, TruncatedChunkError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import RootSurvey, SharedRoot, Tier, TierCapabilities

log = logging.getLogger(__name__)

SUFFIX = ".kvc"
PIN_SUFFIX = ".pin"
STRAY_AGE_S = 2.0  # an unlocked temp file this old is a stray even if a process of its pid runs
_READ_SEGMENT = 8 << 20  # read in 8 MiB pieces so hashing one overlaps reading the next
_HEX = frozenset("0123456789abcdef")

DiskMode = Literal["private", "group"]
# (file mode, directory mode): private to the user, or shared with the root's group (setgid
# directories, so every file gets that group); applied with fchmod, so the umask cannot narrow
# nor widen them.
MODES: dict[str, tuple[int, int]] = {"private": (0o600, 0o700), "group": (0o640, 0o2770)}

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_RECORD = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR})
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


def _read_small(name: str, dir_fd: int, limit: int = 256) -> bytes:
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


def _remove_stray(dir_fd: int, name: str) -> int:
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


def _subdirs(dir_fd: int) -> list[str]:
    """Names of the real (not symlinked) fan-out directories ``[0-9a-f]{2}`` in ``dir_fd``."""
    with os.scandir(dir_fd) as entries:
        return [e.name for e in entries if len(e.name) == 2 and set(e.name) <= _HEX
                and e.is_dir(follow_symlinks=False)]


def _survey_dir(dir_fd: int, chunks: set[ChunkKey] | None) -> int:
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


def _layout_dirs(layout_fd: int) -> Iterator[int]:
    """Descriptors of the places files live in one layout subtree: ``pins`` and every
    ``<2 hex>/<2 hex>`` fan-out directory (real directories only; closed after each step)."""
    places: list[tuple[int, str]] = [(layout_fd, "pins")]
    places += [(layout_fd, d1) for d1 in _subdirs(layout_fd)]
    for parent, name in places:
        try:
            fd = open_dir(name, parent)
        except OSError:
            continue
        try:
            if name == "pins":
                yield fd
                continue
            for d2 in _subdirs(fd):
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


class DiskTier(Tier):
    name = "disk"
    capabilities = TierCapabilities(authoritative_contains=True, persistent=True, shared=True)

    def __init__(self, layout: KVLayout, *, path: str | os.PathLike[str], capacity_bytes: int,
                 fsync: bool = True, io_threads: int = 4, mode: DiskMode = "private",
                 survey_s: float = 5.0) -> None:
        super().__init__(layout)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._file_mode, self._dir_mode = MODES[mode]
        self.root = layout_root(path, layout)
        top = make_root(path, self._dir_mode)
        try:
            self._fd = open_dir(self.root.name, top, create_mode=self._dir_mode)  # never a symlink
        finally:
            os.close(top)
        self._capacity = capacity_bytes
        self.survey_s = survey_s  # how often a hierarchy re-reads the root (``survey``)
        self._surveyed = time.monotonic()  # the scan at open was one
        self._stray_bytes = 0  # temp files of dead writers that stayed: they take room
        self._fsync = fsync
        self._sizes: dict[ChunkKey, int] = {}  # key -> payload bytes, for files this process knows
        self._used = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvtier-disk")
        self.recovered = self._scan()
        self.pin_files = PinFiles(self.root / "pins", fsync=fsync, mode=mode)

    # --- paths ------------------------------------------------------------------------------
    def path_of(self, key: ChunkKey) -> Path:
        return chunk_path(self.root, key)

    def _chunk_dir(self, key: ChunkKey, *, create: bool = False) -> tuple[int, str]:
        """A descriptor of the chunk's directory (the caller closes it) and the file's name.

        Walked from the layout subtree one real directory at a time: a symlink planted anywhere
        below the root is never followed (``OSError``)."""
        h = key.hex()
        mode = self._dir_mode if create else None
        fd1 = open_dir(h[:2], self._fd, create_mode=mode)
        try:
            return open_dir(h[2:4], fd1, create_mode=mode), h + SUFFIX
        finally:
            os.close(fd1)

    # --- restart ----------------------------------------------------------------------------
    def _scan(self) -> list[tuple[ChunkKey, float]]:
        """Rebuild the index from the files; returns (key, mtime) oldest first, for LRU seeding.

        Only the known layout is walked (two fan-out levels of real directories), iteratively:
        anything else under the root, however deep, is not ours and is not read."""
        found: list[tuple[ChunkKey, float, int]] = []
        for d1 in _subdirs(self._fd):
            with contextlib.suppress(OSError):
                fd1 = open_dir(d1, self._fd)
                try:
                    for d2 in _subdirs(fd1):
                        with contextlib.suppress(OSError):
                            fd2 = open_dir(d2, fd1)
                            try:
                                found.extend(self._scan_leaf(fd2))
                            finally:
                                os.close(fd2)
                finally:
                    os.close(fd1)
        found.sort(key=lambda item: item[1])
        for key, _mtime, size in found:  # oldest first, so keys() seeds an LRU correctly
            self._sizes[key] = size
            self._used += size
        return [(key, mtime) for key, mtime, _size in found]

    def _scan_leaf(self, dir_fd: int) -> list[tuple[ChunkKey, float, int]]:
        found: list[tuple[ChunkKey, float, int]] = []
        with os.scandir(dir_fd) as entries:
            names = [e.name for e in entries]
        for name in names:
            if name.startswith(TMP_PREFIX):
                self._stray_bytes += _remove_stray(dir_fd, name)
                continue
            if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
                continue
            try:
                key = ChunkKey(bytes.fromhex(name[:-len(SUFFIX)]))
                fd = open_regular(name, dir_fd)
                try:
                    header = decode_header(os.pread(fd, HEADER_BYTES, 0), key=key,
                                           layout_fingerprint=self.layout.fingerprint,
                                           chunk_bytes=self.layout.chunk_bytes)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                if st.st_size != HEADER_BYTES + header.payload_len:
                    raise TruncatedChunkError(f"{name}: {st.st_size} bytes on disk")
            except (ChunkFormatError, ValueError):
                self._drop_corrupt(dir_fd, name)
                continue
            except OSError:
                continue  # removed by another process meanwhile, a symlink, a FIFO...: not a chunk
            found.append((key, st.st_mtime, header.payload_len))
        return found

    def _drop_corrupt(self, dir_fd: int, name: str) -> None:
        self.stats.corrupt += 1
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)

    # --- capacity ---------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """Room for chunks: the configured capacity less the stray temp files found at open."""
        return max(0, self._capacity - self._stray_bytes)

    @property
    def used_bytes(self) -> int:
        return self._used

    def _forget(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._forget_locked(key)

    def _forget_locked(self, key: ChunkKey) -> bool:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
        return size is not None

    # --- the whole root: capacity for every process sharing it ------------------------------
    def shared_root(self) -> SharedRoot:
        return self

    def survey_due(self) -> bool:
        return time.monotonic() - self._surveyed >= self.survey_s

    def survey(self) -> RootSurvey:
        """List the root: this layout's chunk files (by name: no file is opened) and the bytes of
        everything else (other layouts' subtrees, temp files, pin records).  Only the known
        layout is walked, never through a symlink.  ``ContextMemory`` adopts the chunks into its
        index and leaves the rest room, so ``capacity_bytes`` bounds the whole root."""
        self._surveyed = time.monotonic()
        chunks: set[ChunkKey] = set()
        other = 0
        top = os.open(self.root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(top) as entries:
                layouts = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
            for name in layouts:
                try:
                    layout_fd = open_dir(name, top)
                except OSError:
                    continue
                try:
                    mine = chunks if name == self.root.name else None
                    for fd in _layout_dirs(layout_fd):
                        other += _survey_dir(fd, mine)
                finally:
                    os.close(layout_fd)
        finally:
            os.close(top)
        return RootSurvey(frozenset(chunks), other)

    def forget(self, keys: Sequence[ChunkKey]) -> None:
        """Stop counting chunks another process deleted (their files are gone)."""
        for key in keys:
            self._forget(key)

    # --- operations -------------------------------------------------------------------------
    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        self.layout.check_payload(payload)
        with self._lock:  # reserve the space before the slow write
            if key in self._sizes and self.has_file(key):
                return True  # same key = same prefix = same bytes
            self._forget_locked(key)
            if self._used + payload.nbytes > self.capacity_bytes:
                return False
            self._sizes[key] = payload.nbytes
            self._used += payload.nbytes
        try:
            self._write(key, payload)
        except OSError:
            self._forget(key)
            self.stats.errors += 1
            return False
        self.stats.bytes_written += payload.nbytes
        return True

    def _write(self, key: ChunkKey, payload: np.ndarray) -> None:
        dir_fd, final = self._chunk_dir(key, create=True)
        try:
            header = encode_header(key, self.layout.fingerprint, payload)
            replace_in_dir(dir_fd, final, [memoryview(header), payload.data.cast("B")], mode=self._file_mode,
                           fsync=self._fsync)
            if self._fsync:  # make the rename itself durable
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        try:
            dir_fd, name = self._chunk_dir(key)
        except FileNotFoundError:
            self._forget(key)  # evicted by another process
            return False
        except OSError:
            self.stats.errors += 1
            return False
        try:
            return self._get_in(dir_fd, name, key, out)
        finally:
            os.close(dir_fd)

    def _get_in(self, dir_fd: int, name: str, key: ChunkKey, out: np.ndarray) -> bool:
        try:
            fd = open_regular(name, dir_fd)
        except FileNotFoundError:
            self._forget(key)  # evicted by another process
            return False
        except OSError:  # a symlink, FIFO or directory where the chunk belongs: a miss
            self._forget(key)
            self.stats.errors += 1
            return False
        try:
            size = self._read_verified(fd, key, out)
        except ChunkFormatError:
            self._forget(key)
            self._drop_corrupt(dir_fd, name)
            return False
        except OSError:
            self.stats.errors += 1
            return False
        finally:
            os.close(fd)
        # A file another process wrote is served but not counted here: capacity has one owner
        # (``ContextMemory``'s index adopts it if it has room); counting it in both places made
        # puts the index had room for fail here.
        self.stats.bytes_read += size
        return True

    def _read_verified(self, fd: int, key: ChunkKey, out: np.ndarray) -> int:
        n = self.layout.chunk_bytes
        if out.nbytes < n:
            raise LayoutError(f"output buffer of {out.nbytes} bytes is too small for a {n}-byte chunk")
        header = decode_header(os.pread(fd, HEADER_BYTES, 0), key=key,
                               layout_fingerprint=self.layout.fingerprint, chunk_bytes=n)
        if os.fstat(fd).st_size != HEADER_BYTES + n:
            raise TruncatedChunkError(f"{key.hex()}: file size does not match its header")
        view = out.data.cast("B")
        hasher = xxhash.xxh3_64()
        offset = 0
        while offset < n:
            end = min(n, offset + _READ_SEGMENT)
            got = os.preadv(fd, [view[offset:end]], HEADER_BYTES + offset)
            if got <= 0:
                raise TruncatedChunkError(f"{key.hex()}: file ended at payload byte {offset}")
            hasher.update(view[offset:offset + got])
            offset += got
        if hasher.intdigest() != header.payload_checksum:
            raise CorruptChunkError(f"{key.hex()}: payload checksum mismatch")
        return n

    def has_file(self, key: ChunkKey) -> bool:
        """Is there a regular file (not a symlink, FIFO or directory) at the chunk's path?"""
        try:
            dir_fd, name = self._chunk_dir(key)
        except OSError:
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False
        finally:
            os.close(dir_fd)

    def contains(self, key: ChunkKey) -> bool:
        if key in self._sizes:
            return True
        return self.has_file(key)  # written by another process sharing the root

    def delete(self, key: ChunkKey) -> bool:
        known = self._forget(key)
        try:
            dir_fd, name = self._chunk_dir(key)
        except OSError:
            return known
        try:
            os.unlink(name, dir_fd=dir_fd)  # a symlink itself, never its target
        except FileNotFoundError:
            return known
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.stats.errors += 1
            return known
        finally:
            os.close(dir_fd)
        return True

    def keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            return iter(list(self._sizes))

    # --- batch: parallel on the I/O pool ----------------------------------------------------
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) <= 1:
            return super().put_many(keys, payloads)
        return list(self._pool.map(self.put, keys, payloads))

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) <= 1:
            return super().get_many_into(keys, outs)
        return list(self._pool.map(self.get_into, keys, outs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.pin_files.close()
        fd, self._fd = self._fd, -1  # a later call fails (EBADF), never reaches a reused number
        if fd >= 0:
            os.close(fd)


class PinFiles:
    """Pins that outlive the process and are seen by every process sharing a disk root.

    ``<dir>/<key hex>.pin`` holds one line: ``never`` or the wall-clock expiry (Unix seconds).
    A record is written crash-safely (``kvtier._fs``); an expired one is removed when read.
    A record that cannot be parsed counts as pinned with no expiry: a damaged record must not
    lose a warehoused chunk (``unpin`` removes it).  Unlike in-process pins, records are not
    counted: pinning twice keeps the later expiry (``never`` wins), one unpin removes it.
    ``<dir>`` is reached without following a symlink at its own name, and only regular files
    are read as records (anything else there is ignored: not pinned).
    """

    def __init__(self, directory: Path, *, fsync: bool = True, recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.time, cache_entries: int = 16_384,
                 mode: DiskMode = "private") -> None:
        self.dir = directory
        self._fsync = fsync
        self._clock = clock
        self._file_mode, self._dir_mode = MODES[mode]
        self._fd = -1  # of ``dir``, opened at first use
        self._fd_lock = threading.Lock()
        # ``in`` answers are cached for ``recheck_s``: eviction asks about every candidate victim,
        # and a warehouse of thousands of pinned chunks must not cost thousands of file opens per
        # eviction.  This process's own pins and unpins update the cache at once; another
        # process's are seen within ``recheck_s``.  The cache is an LRU of ``cache_entries``
        # answers (~200 B each: 16384 is ~3 MiB): eviction asks about the same cold keys again
        # and again, so a small one keeps nearly every hit; a key that fell out costs one open.
        self.recheck_s = recheck_s
        self.cache_entries = cache_entries
        self._seen: OrderedDict[ChunkKey, tuple[float | Literal[False] | None, float]] = OrderedDict()
        self._seen_lock = threading.Lock()

    def _dir_fd(self, *, create: bool = False) -> int:
        """A descriptor of ``dir`` (kept open); FileNotFoundError while it does not exist."""
        with self._fd_lock:
            if self._fd < 0:
                parent = os.open(self.dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    self._fd = open_dir(self.dir.name, parent, create_mode=self._dir_mode if create else None)
                finally:
                    os.close(parent)
            return self._fd

    def close(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def _remember(self, key: ChunkKey, expires: float | Literal[False] | None, now: float) -> None:
        with self._seen_lock:
            self._seen[key] = (expires, now)
            self._seen.move_to_end(key)
            while len(self._seen) > self.cache_entries:
                self._seen.popitem(last=False)

    def _path(self, key: ChunkKey) -> Path:
        return self.dir / _record_name(key)

    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None) -> None:
        """Record pins (``ttl_s`` None: until unpinned).  TierError if a record cannot be written
        (a full disk): the records written before it stay, no temp file is left behind."""
        if not keys:
            return
        expires = None if ttl_s is None else self._clock() + ttl_s
        try:
            dir_fd = self._dir_fd(create=True)
            for key in keys:
                if expires is not None:
                    current = self.expiry(key)
                    if current is not False and (current is None or current >= expires):
                        continue  # already pinned at least as long
                self._write_record(dir_fd, key, "never\n" if expires is None else f"{expires!r}\n")
                self._remember(key, expires, time.monotonic())
            if self._fsync:
                os.fsync(dir_fd)
        except OSError as exc:
            raise TierError(f"cannot write a pin record in {self.dir}: {exc}") from exc

    def _write_record(self, dir_fd: int, key: ChunkKey, text: str) -> None:
        # the record is fsynced before its rename: a crash leaves no empty record (which would
        # read as pinned for good); ``pin`` fsyncs the directory once for all its records
        replace_in_dir(dir_fd, _record_name(key), text.encode(), mode=self._file_mode, fsync=self._fsync)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        try:
            dir_fd = self._dir_fd()
        except FileNotFoundError:
            dir_fd = -1  # no record was ever written
        for key in keys:
            if dir_fd >= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_record_name(key), dir_fd=dir_fd)
            self._remember(key, False, time.monotonic())

    def expiry(self, key: ChunkKey) -> float | Literal[False] | None:
        """False: not pinned; None: pinned until unpinned; else the expiry (Unix seconds)."""
        name = _record_name(key)
        try:
            dir_fd = self._dir_fd()
            raw = _read_small(name, dir_fd)
        except NotRegularFileError:
            return False  # a FIFO or directory is not a record (and is never opened blocking)
        except OSError as exc:  # missing, or a symlink (ELOOP; ENOTDIR for the directory): no record
            return False if exc.errno in _NO_RECORD else None  # unreadable: keep the chunk
        text = raw.decode(errors="replace").strip()
        if text == "never":
            return None
        try:
            expires = float(text)
        except ValueError:
            return None
        if expires <= self._clock():
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            return False
        return expires

    def __contains__(self, key: ChunkKey) -> bool:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[1] < self.recheck_s:
            expires = seen[0]
        else:  # the common case: one failed open of a missing file
            expires = self.expiry(key)
            self._remember(key, expires, now)
        return expires is None or (expires is not False and expires > self._clock())

    def records(self) -> dict[ChunkKey, float | None]:
        """Every live pin: key -> expiry (None = until unpinned); expired records are removed."""
        found: dict[ChunkKey, float | None] = {}
        try:
            dir_fd = self._dir_fd()
            with os.scandir(dir_fd) as entries:
                names = [e.name for e in entries]
        except FileNotFoundError:
            return found
        except OSError:
            return found  # a symlink or a file where the pins directory belongs: no records
        for name in names:
            if name.startswith(TMP_PREFIX):
                _remove_stray(dir_fd, name)
                continue
            if not name.endswith(PIN_SUFFIX) or len(name) != 2 * KEY_BYTES + len(PIN_SUFFIX):
                continue
            try:
                key = ChunkKey(bytes.fromhex(name[:-len(PIN_SUFFIX)]))
            except ValueError:
                continue
            expires = self.expiry(key)
            if expires is not False:
                found[key] = expires
        return found


def _record_name(key: ChunkKey) -> str:
    return key.hex() + PIN_SUFFIX
