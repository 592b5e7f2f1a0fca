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

Hostile roots: nothing under the layout subtree is trusted: never a symlink followed, only
regular files read, modes set whatever the umask (``kvtier.tiers.disk_files``).

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
no process sharing the root may evict, across restarts (``PinFiles``, ``kvtier.tiers.disk_pins``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from kvtier._fs import TMP_PREFIX, replace_in_dir
from kvtier.codec import HEADER_BYTES, decode_header, encode_header
from kvtier.errors import ChunkFormatError, CorruptChunkError, LayoutError, TruncatedChunkError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import RootSurvey, SharedRoot, Tier, TierCapabilities
from kvtier.tiers.disk_files import (
    MODES,
    SUFFIX,
    DiskMode,
    chunk_path,
    layout_dirs,
    layout_root,
    make_root,
    open_dir,
    open_regular,
    remove_stray,
    subdirs,
    survey_dir,
)
from kvtier.tiers.disk_pins import PinFiles

_READ_SEGMENT = 8 << 20  # read in 8 MiB pieces so hashing one overlaps reading the next

# The names other modules and the README know from here (the files and pins modules hold the rest).
__all__ = ["SUFFIX", "DiskTier", "PinFiles", "chunk_path", "layout_root"]


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
        for d1 in subdirs(self._fd):
            with contextlib.suppress(OSError):
                fd1 = open_dir(d1, self._fd)
                try:
                    for d2 in subdirs(fd1):
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
                self._stray_bytes += remove_stray(dir_fd, name)
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
                    for fd in layout_dirs(layout_fd):
                        other += survey_dir(fd, mine)
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
