"""Control-plane state of the hierarchy: which tier holds which chunk, capacity, pins.

No payloads here.  ``TierIndex`` mirrors one tier (keys, sizes, used bytes against capacity) and
owns that tier's eviction policy; ``PinSet`` holds pins (token warehousing) with optional
expiry.  The hierarchy asks ``plan_room`` for victims before a put, then moves the bytes.  The
trace simulator drives these same classes with no tiers behind them.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable

from kvtier.keys import ChunkKey
from kvtier.policy.eviction import EvictionPolicy


class TierIndex:
    """Keys, sizes and eviction order of one tier, as this process knows them."""

    def __init__(self, name: str, capacity_bytes: int, policy: EvictionPolicy) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.sizes: dict[ChunkKey, int] = {}
        self.used_bytes = 0
        # told of every key entering (True) or leaving (False) the index: an engine's scheduler
        # mirrors the worker's hierarchy from these (kvtier.integrations.vllm_worker)
        self.on_change: Callable[[str, ChunkKey, bool], None] | None = None

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, key: ChunkKey, size: int) -> None:
        if key in self.sizes:
            self.policy.access(key)
            return
        self.sizes[key] = size
        self.used_bytes += size
        self.policy.insert(key, size)
        if self.on_change is not None:
            self.on_change(self.name, key, True)

    def touch(self, key: ChunkKey) -> None:
        self.policy.access(key)

    def touch_copy(self, key: ChunkKey) -> None:
        """A tier above served this chunk; this tier holds a copy (see ``EvictionPolicy.access_above``)."""
        self.policy.access_above(key)

    def discard(self, key: ChunkKey) -> None:
        size = self.sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size
            self.policy.remove(key)
            if self.on_change is not None:
                self.on_change(self.name, key, False)

    def plan_room(self, size: int, evictable: Callable[[ChunkKey], bool],
                  admit: ChunkKey | None = None) -> list[ChunkKey] | None:
        """Victims to evict so ``size`` more bytes fit, removed from the index; None if impossible.

        ``admit``: the key that will enter; when a victim is needed the policy may refuse it
        (``EvictionPolicy.admit``), and None is returned.  On None nothing changed.  Victims
        leave the index now; the caller moves their bytes.
        """
        if size > self.capacity_bytes:
            return None
        if self.used_bytes + size <= self.capacity_bytes:
            return []
        if admit is not None and not self.policy.admit(admit, size):
            return None
        victims: list[ChunkKey] = []
        freed = 0
        while self.used_bytes - freed + size > self.capacity_bytes:
            key = self.policy.pop_victim(evictable)
            if key is None:
                for v in victims:  # roll back: reinsert in the same order
                    self.policy.insert(v, self.sizes[v])
                return None
            victims.append(key)
            freed += self.sizes[key]
        for key in victims:
            self.used_bytes -= self.sizes.pop(key)
            if self.on_change is not None:
                self.on_change(self.name, key, False)
        return victims


class PinSet:
    """Pinned chunks (never evicted), counted per pin so nested pins need as many unpins.

    A pin may expire: ``pin(keys, ttl_s=...)``.  Expired pins lapse lazily on the next query.
    Each key keeps one entry per live pin (its deadline, None: none); ``unpin`` drops the most
    recent one and an expiry drops only its own entry, so a TTL pin that was unpinned and
    replaced by a permanent one cannot take the permanent one with it when its deadline comes.
    The expiry heap keeps an unpinned TTL pin's entry until its deadline, so it is rebuilt
    from the live pins once it holds more than twice as many entries (plus slack): a pin/unpin
    loop with a long TTL stays as small as the pins it holds.
    """

    _SLACK = 64  # stale expiry entries tolerated beyond 2 x the live TTL pins before a rebuild

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._pins: dict[ChunkKey, list[float | None]] = {}  # key -> deadline of each live pin
        self._expiry: list[tuple[float, ChunkKey]] = []  # heap of (deadline, key) for TTL pins
        self._num_ttl = 0  # live pins with a deadline (each has an entry in ``_expiry``)
        self._clock = clock

    def pin(self, keys: Iterable[ChunkKey], ttl_s: float | None = None) -> None:
        deadline = None if ttl_s is None else self._clock() + ttl_s
        for key in keys:
            self._pins.setdefault(key, []).append(deadline)
            if deadline is not None:
                heapq.heappush(self._expiry, (deadline, key))
                self._num_ttl += 1
        if len(self._expiry) > 2 * self._num_ttl + self._SLACK:
            self._compact()

    def _compact(self) -> None:
        """Rebuild ``_expiry`` from the live TTL pins.  An expiry drops a pin by its deadline's
        value, so one entry per live pin expires exactly what the stale ones would have."""
        self._expiry = [(d, key) for key, deadlines in self._pins.items() for d in deadlines if d is not None]
        heapq.heapify(self._expiry)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        for key in keys:
            self._drop(key, None, latest=True)

    def _drop(self, key: ChunkKey, deadline: float | None, *, latest: bool = False) -> None:
        """Remove the most recent pin of ``key`` (``latest``), or the one expiring at ``deadline``."""
        deadlines = self._pins.get(key)
        if not deadlines:
            return
        if latest:
            if deadlines.pop() is not None:
                self._num_ttl -= 1
        elif deadline in deadlines:
            deadlines.remove(deadline)  # else unpinned already: its heap entry is stale
            self._num_ttl -= 1
        if not deadlines:
            del self._pins[key]

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            deadline, key = heapq.heappop(self._expiry)
            self._drop(key, deadline)

    def __contains__(self, key: ChunkKey) -> bool:
        if self._expiry:
            self._expire()
        return key in self._pins

    def __len__(self) -> int:
        self._expire()
        return len(self._pins)
