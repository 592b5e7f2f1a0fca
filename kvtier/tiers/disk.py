"""G3: local disk (NVMe), one file per chunk.

Path: ``<root>/<layout fingerprint hex>/<key[0:2]>/<key[2:4]>/<key hex>.kvc``: one subtree per
layout (so models can share a root without seeing each other's files), two levels of 256-way
hex fan-out so no directory grows huge.  Bytes: the chunk format of ``kvtier.codec`` (64-byte
header with checksums, then the payload).

Crash safety: a put writes ``.tmp.<pid>.<random>`` in the chunk's directory, fsyncs it, and
``os.replace``s it onto the final name (atomic on POSIX), then fsyncs the directory.  A crash
leaves either the old state or the whole new file, plus at worst a temp file that the next
open removes once its writer's pid is gone.  A torn or bit-rotted file fails its checksum on
read: it is deleted, counted, and reported as a miss.

Sharing: several processes on one node may use one root.  Same key means same bytes, so two
writers racing on a key are harmless (last rename wins).  Each process indexes what it wrote or
found at open; a key another process wrote later is found by ``contains`` (one ``stat``), and a
file another process evicted turns into a miss.  Capacity is enforced per process over the files
it wrote or found at open (a file of another process that it merely reads is not counted: in a
hierarchy the index is the one owner of capacity and adopts such a chunk when it has room).

I/O runs on a thread pool (``io_threads``): batch gets and puts proceed in parallel, and file
reads (which release the GIL) overlap checksum work on another core.

Persistent pins (token warehousing): ``<root>/<layout fp>/pins/<key hex>.pin`` marks a chunk that
no process sharing the root may evict, across restarts (``PinFiles``).  One small text file per
pinned chunk, so another process checks a candidate victim by opening one small file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from kvtier.codec import HEADER_BYTES, decode_header, encode_header
from kvtier.errors import ChunkFormatError, CorruptChunkError, LayoutError, TierError, TruncatedChunkError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier

SUFFIX = ".kvc"
PIN_SUFFIX = ".pin"
TMP_PREFIX = ".tmp."
_READ_SEGMENT = 8 << 20  # read in 8 MiB pieces so hashing one overlaps reading the next


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def layout_root(path: str | os.PathLike[str], layout: KVLayout) -> Path:
    """One layout's subtree of a disk tier's root: ``<path>/<layout fingerprint hex>``."""
    return Path(path) / f"{layout.fingerprint:016x}"


def chunk_path(layout_root: Path, key: ChunkKey) -> Path:
    """Where chunk ``key`` lives under one layout's subtree (``<root>/<layout fp hex>``)."""
    h = key.hex()
    return layout_root / h[:2] / h[2:4] / (h + SUFFIX)


def _remove_stray_file(full: str, name: str) -> None:
    """Remove a temp file ``.tmp.<pid>.<random>`` whose writer is gone (not this process)."""
    try:
        pid = int(name.split(".")[2])
    except (IndexError, ValueError):
        pid = -1
    if pid != os.getpid() and (pid <= 0 or not _pid_alive(pid)):
        with contextlib.suppress(OSError):
            os.unlink(full)


class DiskTier(Tier):
    name = "disk"
    persistent = True
    shared = True

    def __init__(self, layout: KVLayout, *, path: str | os.PathLike[str], capacity_bytes: int,
                 fsync: bool = True, io_threads: int = 4) -> None:
        super().__init__(layout)
        self.root = layout_root(path, layout)
        self.root.mkdir(parents=True, exist_ok=True)
        self._capacity = capacity_bytes
        self._fsync = fsync
        self._sizes: dict[ChunkKey, int] = {}  # key -> payload bytes, for files this process knows
        self._used = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvtier-disk")
        self.recovered = self._scan()
        self.pin_files = PinFiles(self.root / "pins", fsync=fsync)

    # --- paths ------------------------------------------------------------------------------
    def path_of(self, key: ChunkKey) -> Path:
        return chunk_path(self.root, key)

    # --- restart ----------------------------------------------------------------------------
    def _scan(self) -> list[tuple[ChunkKey, float]]:
        """Rebuild the index from the files; returns (key, mtime) oldest first, for LRU seeding."""
        found: list[tuple[ChunkKey, float, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                if name.startswith(TMP_PREFIX):
                    _remove_stray_file(full, name)
                    continue
                if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
                    continue
                try:
                    key = ChunkKey(bytes.fromhex(name[:-len(SUFFIX)]))
                    with open(full, "rb") as f:
                        header = decode_header(f.read(HEADER_BYTES), key=key,
                                               layout_fingerprint=self.layout.fingerprint,
                                               chunk_bytes=self.layout.chunk_bytes)
                        st = os.fstat(f.fileno())
                    if st.st_size != HEADER_BYTES + header.payload_len:
                        raise TruncatedChunkError(f"{full}: {st.st_size} bytes on disk")
                except (ChunkFormatError, ValueError):
                    self._drop_corrupt(full)
                    continue
                except OSError:
                    continue  # removed by another process meanwhile
                found.append((key, st.st_mtime, header.payload_len))
        found.sort(key=lambda item: item[1])
        for key, _mtime, size in found:  # oldest first, so keys() seeds an LRU correctly
            self._sizes[key] = size
            self._used += size
        return [(key, mtime) for key, mtime, _size in found]

    def _drop_corrupt(self, full: str | Path) -> None:
        self.stats.corrupt += 1
        with contextlib.suppress(OSError):
            os.unlink(full)

    # --- capacity ---------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

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

    # --- operations -------------------------------------------------------------------------
    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        self.layout.check_payload(payload)
        with self._lock:  # reserve the space before the slow write
            if key in self._sizes and self.path_of(key).exists():
                return True  # same key = same prefix = same bytes
            self._forget_locked(key)
            if self._used + payload.nbytes > self._capacity:
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
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
        header = encode_header(key, self.layout.fingerprint, payload)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            buffers: list[memoryview] = [memoryview(header), payload.data.cast("B")]
            while buffers:
                written = os.writev(fd, buffers)
                while buffers and written >= len(buffers[0]):
                    written -= len(buffers[0])
                    buffers.pop(0)
                if buffers and written:
                    buffers[0] = buffers[0][written:]
            if self._fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fsync:  # make the rename itself durable
            _fsync_dir(final.parent)

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)  # evicted by another process
            return False
        except OSError:
            self.stats.errors += 1
            return False
        try:
            size = self._read_verified(fd, key, out)
        except ChunkFormatError:
            self._forget(key)
            self._drop_corrupt(path)
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

    def contains(self, key: ChunkKey) -> bool:
        if key in self._sizes:
            return True
        return self.path_of(key).exists()  # written by another process sharing the root

    def delete(self, key: ChunkKey) -> bool:
        known = self._forget(key)
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return known
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.stats.errors += 1
            return known
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


class PinFiles:
    """Pins that outlive the process and are seen by every process sharing a disk root.

    ``<dir>/<key hex>.pin`` holds one line: ``never`` or the wall-clock expiry (Unix seconds).
    A record is written crash-safely (temp file + rename); an expired one is removed when read.
    A record that cannot be parsed counts as pinned with no expiry: a damaged record must not
    lose a warehoused chunk (``unpin`` removes it).  Unlike in-process pins, records are not
    counted: pinning twice keeps the later expiry (``never`` wins), one unpin removes it.
    """

    def __init__(self, directory: Path, *, fsync: bool = True, recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.time, cache_entries: int = 16_384) -> None:
        self.dir = directory
        self._fsync = fsync
        self._clock = clock
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

    def _remember(self, key: ChunkKey, expires: float | Literal[False] | None, now: float) -> None:
        with self._seen_lock:
            self._seen[key] = (expires, now)
            self._seen.move_to_end(key)
            while len(self._seen) > self.cache_entries:
                self._seen.popitem(last=False)

    def _path(self, key: ChunkKey) -> Path:
        return self.dir / (key.hex() + PIN_SUFFIX)

    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None) -> None:
        """Record pins (``ttl_s`` None: until unpinned).  TierError if a record cannot be written
        (a full disk): the records written before it stay, no temp file is left behind."""
        if not keys:
            return
        expires = None if ttl_s is None else self._clock() + ttl_s
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for key in keys:
                if expires is not None:
                    current = self.expiry(key)
                    if current is not False and (current is None or current >= expires):
                        continue  # already pinned at least as long
                self._write_record(key, "never\n" if expires is None else f"{expires!r}\n")
                self._remember(key, expires, time.monotonic())
            if self._fsync:
                _fsync_dir(self.dir)
        except OSError as exc:
            raise TierError(f"cannot write a pin record in {self.dir}: {exc}") from exc

    def _write_record(self, key: ChunkKey, text: str) -> None:
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
        try:
            tmp.write_text(text)
            os.replace(tmp, self._path(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
            self._remember(key, False, time.monotonic())

    def expiry(self, key: ChunkKey) -> float | Literal[False] | None:
        """False: not pinned; None: pinned until unpinned; else the expiry (Unix seconds)."""
        path = self._path(key)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return False
        except OSError:
            return None  # unreadable: keep the chunk
        if text == "never":
            return None
        try:
            expires = float(text)
        except ValueError:
            return None
        if expires <= self._clock():
            with contextlib.suppress(OSError):
                os.unlink(path)
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
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return found
        for name in names:
            if name.startswith(TMP_PREFIX):
                _remove_stray_file(os.path.join(self.dir, name), name)
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
