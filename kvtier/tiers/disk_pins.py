"""Persistent pins (token warehousing): ``<root>/<layout fp>/pins/<key hex>.pin``.

A pin record marks a chunk that no process sharing the disk root may evict, across restarts.
One small text file per pinned chunk, so another process checks a candidate victim by opening
one small file.  Records are written with ``kvtier._fs``'s atomic write and read like chunks:
never through a symlink, only regular files (``kvtier.tiers.disk_files``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from kvtier._fs import TMP_PREFIX, replace_in_dir
from kvtier.errors import TierError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.tiers.disk_files import MODES, DiskMode, NotRegularFileError, open_dir, read_small, remove_stray

PIN_SUFFIX = ".pin"
_NO_RECORD = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR})  # errors meaning "no record here"


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
            raw = read_small(name, dir_fd)
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
                remove_stray(dir_fd, name)
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
