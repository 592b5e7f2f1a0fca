"""What every network tier (Redis, Mooncake) does the same way, written once: ``RemoteTier``.

A subclass moves bytes (pipelines per shard, a staging arena, ...) and leaves to this base:

* **Key naming**: a chunk is ``<key_prefix>:<layout fingerprint, 16 hex>:<chunk key, 32 hex>``
  on the server (``remote_name``), so layouts and deployments sharing a server never meet.
* **The known set and the budget**: the chunks this process wrote or found (``keys()``,
  ``used_bytes``); a put of a new chunk past ``capacity`` is refused before anything is sent
  (``_within_budget``).  The server may hold, evict or expire more: it is shared.
* **Counters**: ``stats.errors`` (keys whose operation failed), ``stats.corrupt``,
  ``stats.extra["short_circuited"]`` (keys answered by an open breaker) and ``["breaker_trips"]``
  (``_count``, ``_breaker_failed``); ``_refused`` counts and rate-limits the log of writes the
  server refused (``stats.extra["refused_writes"]``, for tiers that declare it).
* **Corrupt chunks**: a value that fails validation is logged, counted and deleted, never served
  (``_corrupt``, then ``_drop_corrupt`` once per batch).
* **One deadline per call** (``deadline_s``): ``_deadline()`` opens it for this thread; a nested
  call (the delete of corrupt chunks inside a get) keeps the outer one.
* **Single calls are one-key batches**: subclasses implement only the ``*_many`` methods.

Nothing here raises into the caller on a server fault: failures are counted misses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from kvtier.errors import ChunkFormatError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier, TierCapabilities
from kvtier.tiers.breaker import CircuitBreaker, Deadline

T = TypeVar("T")
_REFUSED_LOG_S = 10.0  # at most one log line about refused writes per this many seconds


def under_deadline(method: Callable[..., T]) -> Callable[..., T]:
    """Run a tier method under one deadline for the whole call (``RemoteTier._deadline``)."""
    @functools.wraps(method)
    def bounded(self: RemoteTier, *args: Any) -> T:
        with self._deadline():
            return method(self, *args)
    return bounded


class RemoteTier(Tier):
    """A tier on a server shared by every instance and node; see the module docstring."""

    capabilities = TierCapabilities(persistent=True, shared=True)
    what: str = "remote"  # the server's kind in log lines ("Redis", "Mooncake")

    def __init__(self, layout: KVLayout, *, key_prefix: str, capacity: int, deadline_s: float,
                 counters: Sequence[str] = ()) -> None:
        super().__init__(layout)
        self._prefix = f"{key_prefix}:{layout.fingerprint:016x}:"
        self._capacity = capacity
        self._deadline_s = deadline_s
        self._known: set[ChunkKey] = set()  # chunks this process wrote or found
        self._lock = threading.Lock()  # guards _known and stats (subclasses may guard more with it)
        self._current = threading.local()  # .deadline: the deadline of this thread's call in progress
        self._refused_logged = -_REFUSED_LOG_S  # time.monotonic() of the last refused-write log line
        self.stats.extra.update({name: 0.0 for name in ("short_circuited", "breaker_trips", *counters)})

    # --- key naming ---------------------------------------------------------------------------
    def remote_name(self, key: ChunkKey) -> str:
        """The chunk's name on the server."""
        return self._prefix + key.hex()

    def chunk_key(self, name: str) -> ChunkKey | None:
        """The chunk key of a server name of this layout and prefix, or None if it is none."""
        if not name.startswith(self._prefix):
            return None
        try:
            raw = bytes.fromhex(name[len(self._prefix):])
        except ValueError:
            return None
        return ChunkKey(raw) if len(raw) == KEY_BYTES else None

    # --- the known set and the budget ---------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return len(self._known) * self.layout.chunk_bytes

    def _within_budget(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[int]:
        """Indexes of the chunks to send: known ones, and new ones while this process's budget lasts."""
        room = self.capacity_bytes - self.used_bytes
        todo: list[int] = []
        for i, (key, payload) in enumerate(zip(keys, payloads, strict=True)):
            if key in self._known:
                todo.append(i)
            elif room >= payload.nbytes:
                room -= payload.nbytes
                todo.append(i)
        return todo

    def _found(self, keys: Sequence[ChunkKey], nbytes: int = 0, *, written: bool = False) -> None:
        """``keys`` are on the server (read: ``nbytes`` read; ``written``: ``nbytes`` written)."""
        with self._lock:
            self._known.update(keys)
            if written:
                self.stats.bytes_written += nbytes
            else:
                self.stats.bytes_read += nbytes

    def _gone(self, keys: Sequence[ChunkKey]) -> None:
        """``keys`` are not on the server (any more)."""
        with self._lock:
            self._known.difference_update(keys)

    def keys(self) -> Iterator[ChunkKey]:
        """The chunks this process wrote or found (a shared store is never listed: a full scan at
        every engine start, and an eviction policy free to delete other instances' chunks)."""
        with self._lock:
            known = list(self._known)
        yield from known

    # --- counters and the breaker -------------------------------------------------------------
    def _count(self, *, errors: int = 0, short_circuited: int = 0, breaker_trips: int = 0,
               corrupt: int = 0) -> None:
        with self._lock:
            self.stats.errors += errors
            self.stats.corrupt += corrupt
            self.stats.extra["short_circuited"] += short_circuited
            self.stats.extra["breaker_trips"] += breaker_trips

    def _breaker_failed(self, breaker: CircuitBreaker, *, errors: int = 0) -> None:
        """A call failed: tell ``breaker`` and count ``errors`` and whether it tripped."""
        trips = breaker.num_trips
        breaker.record_failure()
        self._count(errors=errors, breaker_trips=breaker.num_trips - trips)

    def _refused(self, n: int, why: object, log: logging.Logger) -> None:
        """``n`` writes the server refused (no fault of its health): counted, logged at most every 10 s."""
        now = time.monotonic()
        with self._lock:
            self.stats.errors += n
            self.stats.extra["refused_writes"] += n
            say = now - self._refused_logged >= _REFUSED_LOG_S
            if say:
                self._refused_logged = now
            total = self.stats.extra["refused_writes"]
        if say:
            log.warning("%s refused %d write(s) (%.0f so far): %s: %s", self.what, n, total, type(why).__name__, why)

    # --- corrupt chunks -----------------------------------------------------------------------
    def _corrupt(self, key: ChunkKey, exc: ChunkFormatError, log: logging.Logger) -> None:
        log.warning("%s chunk %s is not servable (%s): deleting it", self.what, key.hex(), exc)

    def _drop_corrupt(self, keys: Sequence[ChunkKey]) -> None:
        """Count and delete chunks that failed validation: never served, never kept."""
        if keys:
            self._count(corrupt=len(keys))
            self.delete_many(keys)

    # --- the call's deadline ------------------------------------------------------------------
    @contextlib.contextmanager
    def _deadline(self) -> Iterator[Deadline]:
        """One deadline of ``deadline_s`` for this thread's tier call; a nested call keeps the outer."""
        outer: Deadline | None = getattr(self._current, "deadline", None)
        if outer is not None:
            yield outer
            return
        deadline = self._current.deadline = Deadline.after(self._deadline_s)
        try:
            yield deadline
        finally:
            self._current.deadline = None

    def _call_deadline(self) -> Deadline | None:
        """The deadline of this thread's call in progress, if any."""
        return getattr(self._current, "deadline", None)

    # --- single calls are one-key batches -----------------------------------------------------
    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        return self.put_many([key], [payload])[0]

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        return self.get_many_into([key], [out])[0]

    def contains(self, key: ChunkKey) -> bool:
        return self.contains_many([key])[0]

    def delete(self, key: ChunkKey) -> bool:
        return self.delete_many([key])[0]

    @abstractmethod
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        """The batch call; subclasses move the bytes."""

    @abstractmethod
    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        """The batch call; subclasses move the bytes."""

    @abstractmethod
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """The batch call; subclasses move the bytes."""

    @abstractmethod
    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """The batch call; subclasses move the bytes."""
