"""Eviction policies: which chunk of a tier goes first.  Keys and sizes only, never bytes.

A policy sees every insert, access and removal of one tier and, when asked, pops the next
victim among the chunks that may be evicted (``evictable(key)`` is False for pinned or
in-flight chunks).  The same objects drive the real hierarchy and the payload-free simulator.
By name (``eviction = "..."``): ``kvtier.policy.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from kvtier.keys import ChunkKey
from kvtier.policy.retention import Retention


class EvictionPolicy(ABC):
    name: str
    ranks: ClassVar[bool] = False  # answers ``colder`` (predicts reuse); else a prefetch takes free room only

    @abstractmethod
    def insert(self, key: ChunkKey, size: int) -> None:
        """A chunk entered the tier."""

    @abstractmethod
    def access(self, key: ChunkKey) -> None:
        """A chunk in the tier was read (a hit)."""

    def access_above(self, key: ChunkKey) -> None:
        """A tier above served its own copy of this chunk (this tier holds a write-through copy).

        Recency policies count it as a read: the copy is as hot as the chunk served, and a
        lower tier that never sees reads would otherwise evict exactly the hottest chunks.
        """
        self.access(key)

    def admit(self, key: ChunkKey, size: int) -> bool:
        """May ``key`` enter this tier, full now, at the cost of a victim?  (Admission control.)"""
        return True

    def observe(self, keys: Sequence[ChunkKey], *, session: str | None = None, now: float | None = None,
                retention: Retention | None = None) -> None:
        """A request of ``session`` at time ``now`` is about to read ``keys`` (its full chunk list),
        and asks ``retention`` for them (``kvtier.policy.retention``).

        A hint; policies that predict reuse use it (``AgentPolicy``), the others ignore it.
        """
        return None

    def colder(self, victim: ChunkKey, than: ChunkKey) -> bool:
        """Is ``victim`` (held in this tier) predicted to be needed after ``than``?  A prefetch may
        take only the room of colder chunks (``kvtier.prefetch``); a policy that predicts nothing
        answers False, so a prefetch takes free room only."""
        return False

    def observe_end(self, session: str, *, awaits: str) -> None:
        """``session``'s request got its answer, which waits for ``awaits``: "tool" (a tool loop
        calls back soon) or "user" (a human's turn).  A hint, as ``observe``."""
        return None

    @abstractmethod
    def remove(self, key: ChunkKey) -> None:
        """A chunk left the tier for a reason other than ``pop_victim`` (delete, corruption)."""

    @abstractmethod
    def pop_victim(self, evictable: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        """Choose, forget and return the next chunk to evict; None if none is evictable."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()  # oldest first

    def insert(self, key: ChunkKey, size: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: ChunkKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def pop_victim(self, evictable: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class PrefixLRUPolicy(LRUPolicy):
    """LRU that, within one request's prefix, evicts the deepest chunk first.

    The hierarchy reads a hit prefix root to leaf (chunk 0 first), so plain LRU leaves the
    *root* as the oldest chunk of a conversation and evicts it first, which strands every
    deeper chunk (a prefix lookup stops at the first miss).  Here a burst of consecutive reads
    (no insert, removal or eviction in between, and no key read twice) is reordered when it
    ends: last read oldest, first read newest, so a conversation shrinks from its tail and
    keeps a reusable prefix.  Engines order their own free block queues the same way.
    """

    name = "lru-prefix"

    def __init__(self) -> None:
        super().__init__()
        self._burst: list[ChunkKey] = []  # keys read since the burst began, in read order
        self._in_burst: set[ChunkKey] = set()

    def access(self, key: ChunkKey) -> None:
        if key in self._order:
            if key in self._in_burst:  # a key read again: a new request's prefix began
                self._end_burst()
            self._order.move_to_end(key)
            self._burst.append(key)
            self._in_burst.add(key)

    def _end_burst(self) -> None:
        for key in reversed(self._burst):
            if key in self._order:
                self._order.move_to_end(key)
        self._burst.clear()
        self._in_burst.clear()

    def insert(self, key: ChunkKey, size: int) -> None:
        self._end_burst()
        super().insert(key, size)

    def remove(self, key: ChunkKey) -> None:
        self._end_burst()
        super().remove(key)

    def pop_victim(self, evictable: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        self._end_burst()
        return super().pop_victim(evictable)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO, a ghost FIFO.

    New chunks enter the small queue (10% of entries); one that is read again before it leaves
    moves to main, the rest are evicted early.  This resists scans (one-off long prompts) that
    flush an LRU, which matters for agent traffic where a one-shot sub-agent context should not
    push out the shared system prompt.  Ghost entries remember recently evicted keys so a quick
    re-insert goes straight to main.
    """

    name = "s3fifo"

    def __init__(self, small_fraction: float = 0.1) -> None:
        self._small: OrderedDict[ChunkKey, None] = OrderedDict()
        self._main: OrderedDict[ChunkKey, None] = OrderedDict()
        self._ghost: OrderedDict[ChunkKey, None] = OrderedDict()
        self._freq: dict[ChunkKey, int] = {}
        self._small_fraction = small_fraction

    def insert(self, key: ChunkKey, size: int) -> None:
        if key in self._freq:
            return
        self._freq[key] = 0
        if key in self._ghost:  # evicted recently and back again: it is not a one-off
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: ChunkKey) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def access_above(self, key: ChunkKey) -> None:
        """Ignored: the frequency bit means "read again while in *this* tier".  Counting reads
        served above would move every copy to main and stop filtering one-off prefixes (measured
        on the kv-cache-tester traces with a disk tier: 90.6% -> 72.5% token hit rate)."""

    def remove(self, key: ChunkKey) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def pop_victim(self, evictable: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        total = len(self._freq)
        # Each loop step moves or evicts one entry; 2 rounds over all entries bound the work
        # (pinned entries are rotated, not evicted).
        for _ in range(2 * total + 2):
            use_small = self._small and (len(self._small) >= self._small_fraction * total or not self._main)
            queue = self._small if use_small else self._main
            if not queue:
                return None
            key = next(iter(queue))
            del queue[key]
            if not evictable(key):
                queue[key] = None
                continue
            if use_small:
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._ghost[key] = None
                while len(self._ghost) > max(total, 1):
                    self._ghost.popitem(last=False)
            elif self._freq[key] > 0:
                self._freq[key] -= 1
                self._main[key] = None
                continue
            del self._freq[key]
            return key
        return None

    def __len__(self) -> int:
        return len(self._freq)
