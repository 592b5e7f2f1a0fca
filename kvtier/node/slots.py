"""The service's slot table: which chunk is in which slot of the shared pool, and each slot's state.

Keys, slot numbers and owners only, never bytes (the clients copy those).  Each slot is in one state::

    FREE --reserve--> RESERVED --commit--> PUBLISHED --delete / evict--> FREE
      ^                  |  (owner's)          |   ^                       (DEAD first while acquired:
      +--abort / owner---+                  acquire release                 freed by the last release)
         disconnects

* **RESERVED**: one client writes the chunk into the slot.  Invisible to ``lookup``/``acquire``, never a
  victim.  One reservation per key at a time.  When its owner goes (``reclaim``), the slot is FREE
  again: a half-written chunk is never published.
* **PUBLISHED**: readable.  ``acquire`` pins it for a reader (counted per owner); a pinned slot is no
  victim, and a delete or eviction of it leaves it **DEAD** (unlisted, not reused) until the last pin
  goes.
* Eviction: when a reserve finds no FREE slot, the least recently used unpinned PUBLISHED chunk goes
  (``kvtier.policy.eviction.LRUPolicy``; ``acquire`` and a reserve of a held key count as uses).

Owners are opaque ints (the service's connection ids).  Not thread-safe: the service runs one loop.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.keys import ChunkKey
from kvtier.policy.eviction import LRUPolicy
from kvtier.tiers.node_wire import HELD, NO_ROOM

__all__ = ["HELD", "NO_ROOM", "SlotError", "SlotTable"]

COUNTERS = ("hits", "misses", "evictions", "reclaimed_reservations", "reclaimed_pins")


class SlotError(Exception):
    """A client named a slot it does not own in that state (a bug or a hostile peer)."""


@dataclass(slots=True)
class Owner:
    reserved: dict[int, ChunkKey] = field(default_factory=dict)  # slot -> key being written
    pins: Counter[int] = field(default_factory=Counter)  # slot -> acquires not yet released


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a min-heap: low slots first, so batches tend to be runs
        self._published: dict[ChunkKey, int] = {}
        self._key_of: dict[int, ChunkKey] = {}  # published slot -> key
        self._reserving: dict[ChunkKey, int] = {}  # key -> its reserved slot
        self._pins: Counter[int] = Counter()
        self._dead: set[int] = set()
        self._owners: dict[int, Owner] = {}
        self._lru = LRUPolicy()
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    # --- readers ---------------------------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [key in self._published for key in keys]

    def acquire(self, owner: int, keys: Sequence[ChunkKey]) -> list[int]:
        """Pin each published key's slot for reading (``NO_ROOM`` for a miss)."""
        pins = self._owner(owner).pins
        slots = []
        for key in keys:
            slot = self._published.get(key, NO_ROOM)
            if slot != NO_ROOM:
                self._pins[slot] += 1
                pins[slot] += 1
                self._lru.access(key)
            slots.append(slot)
        hits = sum(s != NO_ROOM for s in slots)
        self.counters["hits"] += hits
        self.counters["misses"] += len(slots) - hits
        return slots

    def release(self, owner: int, slots: Sequence[int]) -> None:
        pins = self._owner(owner).pins
        if any(pins[s] < n for s, n in Counter(slots).items()):
            raise SlotError("release of a slot this client has not acquired")
        for slot in slots:
            pins[slot] -= 1
            if not pins[slot]:
                del pins[slot]
            self._unpin(slot)

    # --- writers ---------------------------------------------------------------------------
    def reserve(self, owner: int, keys: Sequence[ChunkKey]) -> list[int]:
        """A slot per key for its owner to write (``NO_ROOM``, or ``HELD`` if already published)."""
        reserved = self._owner(owner).reserved
        slots = []
        for key in keys:
            if key in self._published:
                self._lru.access(key)
                slots.append(HELD)
            elif key in self._reserving or not self._make_room():
                slots.append(NO_ROOM)
            else:
                slot = heapq.heappop(self._free)
                reserved[slot] = key
                self._reserving[key] = slot
                slots.append(slot)
        return slots

    def commit(self, owner: int, slots: Sequence[int]) -> None:
        """Publish the owner's reserved slots (their bytes are written)."""
        reserved = self._owned(owner, slots)
        for slot in slots:
            key = reserved.pop(slot)
            del self._reserving[key]
            self._published[key] = slot
            self._key_of[slot] = key
            self._lru.insert(key, 1)

    def abort(self, owner: int, slots: Sequence[int]) -> None:
        reserved = self._owned(owner, slots)
        for slot in slots:
            del self._reserving[reserved.pop(slot)]
            heapq.heappush(self._free, slot)

    def delete(self, keys: Sequence[ChunkKey]) -> list[bool]:
        gone = []
        for key in keys:
            slot = self._published.pop(key, None)
            if slot is not None:
                self._lru.remove(key)
                self._drop(slot)
            gone.append(slot is not None)
        return gone

    # --- owners ----------------------------------------------------------------------------
    def reclaim(self, owner: int) -> tuple[int, int]:
        """The owner is gone: free its reservations (unpublished), drop its pins; returns both counts."""
        gone = self._owners.pop(owner, None)
        if gone is None:
            return 0, 0
        for slot, key in gone.reserved.items():
            del self._reserving[key]
            heapq.heappush(self._free, slot)
        for slot, count in gone.pins.items():
            for _ in range(count):
                self._unpin(slot)
        pins = sum(gone.pins.values())
        self.counters["reclaimed_reservations"] += len(gone.reserved)
        self.counters["reclaimed_pins"] += pins
        return len(gone.reserved), pins

    def keys(self) -> list[ChunkKey]:
        return list(self._published)

    def empty(self) -> bool:
        return not self._published and not self._reserving and not self._dead

    def stats(self) -> dict[str, int]:
        return {"slots": self.num_slots, "free": len(self._free), "published": len(self._published),
                "reserved": len(self._reserving), "pinned": len(+self._pins), "dead": len(self._dead),
                **self.counters}

    # --- inside ----------------------------------------------------------------------------
    def _owner(self, owner: int) -> Owner:
        return self._owners.setdefault(owner, Owner())

    def _owned(self, owner: int, slots: Sequence[int]) -> dict[int, ChunkKey]:
        reserved = self._owner(owner).reserved
        if len(set(slots)) != len(slots) or any(s not in reserved for s in slots):
            raise SlotError("commit or abort of a slot this client has not reserved")
        return reserved

    def _make_room(self) -> bool:
        if self._free:
            return True
        victim = self._lru.pop_victim(lambda key: not self._pins[self._published[key]])
        if victim is None:
            return False
        self._drop(self._published.pop(victim))
        self.counters["evictions"] += 1
        return True

    def _drop(self, slot: int) -> None:
        """A published slot left the index: free now, or DEAD until its last reader releases it."""
        del self._key_of[slot]
        if self._pins[slot]:
            self._dead.add(slot)
        else:
            heapq.heappush(self._free, slot)

    def _unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] <= 0:
            del self._pins[slot]
            if slot in self._dead:
                self._dead.discard(slot)
                heapq.heappush(self._free, slot)
