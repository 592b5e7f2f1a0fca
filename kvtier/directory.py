"""The directory: which tier holds which chunk, and what may happen to it next.  No bytes.

``ContextMemory`` plans with the directory, moves bytes through its tiers, and tells the directory
how the move ended: plan -> move -> complete.  The directory holds one ``TierIndex`` per tier (its
keys, used bytes against capacity, and its eviction policy), the pins, and the state of each
(tier, chunk) pair, as one state machine:

    ABSENT --prepare_store--> STORING --complete_store--> PRESENT --(victim, prepare_leave)--> LEAVING
       ^                         |                                                                |
       +-------abort_store-------+                                                                |
       +----------------------------------complete_leave-------------------------------------------+

* **STORING**: room is reserved (indexed, counted against capacity) while the bytes go in.  Never
  reported by ``lookup``, never a victim.
* **PRESENT**: the bytes are in.  A victim when the policy picks it, unless pinned (here or by a
  persistent record) or, in the top tier, *read*.
* **LEAVING**: out of the index (its room is free), its bytes not deleted yet (an eviction victim
  being demoted, a delete).  No store into that tier until it is gone, or the delete would take the
  new copy with it; a reader's accounting does not adopt it again.

Two more ways in: a chunk another process stored is *adopted* ABSENT -> PRESENT (``adopt`` at open,
``record_load`` after a read, ``reconcile`` after a disk survey), and a delete marks a chunk
LEAVING even if this index never had it (``prepare_leave``: the shared tier may hold its bytes).

Readers are counted per chunk, not per (tier, chunk): ``prepare_load`` holds a prefix whichever
tiers serve it, and a chunk promoted into the top tier while held must not be a victim there
either.  A chunk with readers is *LOADING* in the sense of the design (``readers(key) > 0``).

Plain data in and out (keys, levels, lists).  Every method that changes state or reads more than
one entry takes the directory's lock, so one directory can sit behind one lock in a process, and
later behind a process boundary.  The few questions only the tiers can answer (is a chunk still on
disk?) come in as callables, asked under the lock; a remote directory would have the mover ask
them first.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from kvtier.keys import ChunkKey
from kvtier.policy.eviction import EvictionPolicy
from kvtier.policy.index import PinSet, TierIndex
from kvtier.policy.retention import Retention

Evictable = Callable[[ChunkKey], bool]  # may this chunk be a victim?


class PinRecords(Protocol):
    """Persistent pins kept outside the directory (``kvtier.tiers.disk_pins.PinFiles``)."""

    def __contains__(self, key: ChunkKey) -> bool: ...


class KeyState(enum.Enum):
    """Where a chunk stands in one tier (see the module docstring)."""

    ABSENT = "absent"
    STORING = "storing"
    PRESENT = "present"
    LEAVING = "leaving"


@dataclass(slots=True)
class StorePlan:
    """The answer of ``prepare_store``: positions into the keys asked for, and the victims."""

    reserved: list[int] = field(default_factory=list)  # room reserved: STORING until complete/abort
    refused: list[int] = field(default_factory=list)  # no room (full of pinned or read chunks, refused, leaving)
    present: list[int] = field(default_factory=list)  # held already, or repeated in the batch: nothing to write
    victims: list[ChunkKey] = field(default_factory=list)  # LEAVING: the mover demotes, then ``complete_leave``


class Directory:
    """The index, policies, pins and per-chunk state of a hierarchy of ``len(names)`` tiers."""

    def __init__(self, names: Sequence[str], capacities: Sequence[int], policies: Sequence[EvictionPolicy], *,
                 chunk_bytes: int, pin_records: PinRecords | None = None) -> None:
        """``pin_records``: persistent pins kept elsewhere (``PinFiles``), honoured as pins."""
        self.indexes = [TierIndex(name, capacity, policy)
                        for name, capacity, policy in zip(names, capacities, policies, strict=True)]
        self.chunk_bytes = chunk_bytes
        self.pins = PinSet()  # this process's pins
        self.pin_records = pin_records
        self.lock = threading.RLock()  # every method takes it; a caller may hold it across several
        self._storing: set[tuple[int, ChunkKey]] = set()  # (level, key) STORING
        self._leaving: set[tuple[int, ChunkKey]] = set()  # (level, key) LEAVING
        self._readers: Counter[ChunkKey] = Counter()  # held by ``prepare_load``: no top-tier victims
        self._evictable_at = [partial(self.evictable, level) for level in range(len(self.indexes))]

    # --- state ------------------------------------------------------------------------------
    def state(self, level: int, key: ChunkKey) -> KeyState:
        with self.lock:
            if (level, key) in self._storing:
                return KeyState.STORING
            if (level, key) in self._leaving:
                return KeyState.LEAVING
            return KeyState.PRESENT if key in self.indexes[level].sizes else KeyState.ABSENT

    def readers(self, key: ChunkKey) -> int:
        with self.lock:
            return self._readers[key]

    def settled(self) -> bool:
        """Nothing storing, leaving or read: every move has completed."""
        with self.lock:
            return not self._storing and not self._leaving and not +self._readers

    def indexed(self, level: int, key: ChunkKey) -> bool:
        """Does tier ``level``'s index have ``key`` (STORING or PRESENT)?"""
        return key in self.indexes[level].sizes  # one dict read: no lock needed, the answer may change after

    def only_in(self, level: int) -> list[ChunkKey]:
        """Chunks tier ``level`` indexes and the tier below does not, in the order they entered."""
        with self.lock:
            below = self.indexes[level + 1].sizes
            return [key for key in self.indexes[level].sizes if key not in below]

    def leaving(self, level: int, key: ChunkKey) -> bool:
        return (level, key) in self._leaving  # one set read: no lock needed, the answer may change after

    def evictable(self, level: int, key: ChunkKey) -> bool:
        """May ``key`` be a victim in tier ``level``?  Not when pinned (here or by a record),
        STORING, or read and in the top tier."""
        if key in self.pins or (level, key) in self._storing or (level == 0 and key in self._readers):
            return False
        return self.pin_records is None or key not in self.pin_records

    # --- lookup -----------------------------------------------------------------------------
    def locate(self, key: ChunkKey, below: int = -1) -> int | None:
        """The first tier under ``below`` where ``key`` is PRESENT."""
        with self.lock:
            return self._locate(key, below)

    def _locate(self, key: ChunkKey, below: int = -1) -> int | None:
        for level in range(below + 1, len(self.indexes)):
            if key in self.indexes[level] and (level, key) not in self._storing:
                return level
        return None

    def lookup(self, keys: Sequence[ChunkKey]) -> list[int]:
        """The level of each chunk of the longest prefix of ``keys`` PRESENT in some tier."""
        levels: list[int] = []
        with self.lock:
            if self._storing:
                for key in keys:
                    level = self._locate(key)
                    if level is None:
                        break
                    levels.append(level)
                return levels
            top = self.indexes[0].sizes  # the common case, kept tight: it runs in an engine's scheduler loop
            for key in keys:
                if key in top:
                    levels.append(0)
                    continue
                level = self._locate(key, below=0)
                if level is None:
                    break
                levels.append(level)
        return levels

    # --- store: ABSENT -> STORING -> PRESENT or ABSENT --------------------------------------
    def prepare_store(self, level: int, keys: Sequence[ChunkKey], *, room: bool = True,
                      evictable: Evictable | None = None) -> StorePlan:
        """Reserve room in tier ``level`` for each of ``keys`` it does not index yet.

        The policy picks victims (never pinned, STORING or read ones) and may refuse a chunk
        (admission); ``evictable`` replaces both (a prefetch: only colder chunks).  Once one chunk
        is refused, so are the ones after it; ``room=False`` refuses all (the tier has no room to
        give, only a plain buffer).  A chunk LEAVING this tier is refused without ending the run.
        """
        sizes, plan, seen = self.indexes[level].sizes, StorePlan(), set()
        with self.lock:
            for i, key in enumerate(keys):
                if key in sizes or key in seen:  # held (or being written) already
                    if key in sizes:
                        self.indexes[level].touch(key)
                    plan.present.append(i)
                    continue
                seen.add(key)
                leaving = (level, key) in self._leaving
                victims = self._make_room(level, key, evictable) if room and not leaving else None
                room = room and (leaving or victims is not None)
                (plan.reserved if victims is not None else plan.refused).append(i)
                if victims:
                    plan.victims += victims
        return plan

    def prepare_store_one(self, level: int, key: ChunkKey) -> tuple[KeyState, list[ChunkKey]]:
        """``prepare_store`` of one chunk, without the plan (the per-chunk path of demotions and
        write-through): (PRESENT, []) held already, (STORING, victims) reserved, (ABSENT, []) refused."""
        with self.lock:
            if key in self.indexes[level].sizes:
                self.indexes[level].touch(key)
                return KeyState.PRESENT, []
            victims = None if (level, key) in self._leaving else self._make_room(level, key, None)
        return (KeyState.ABSENT, []) if victims is None else (KeyState.STORING, victims)

    def _make_room(self, level: int, key: ChunkKey, evictable: Evictable | None) -> list[ChunkKey] | None:
        """Under the lock: index room for ``key`` (STORING); its victims (LEAVING), or None."""
        index = self.indexes[level]
        victims = (index.plan_room(self.chunk_bytes, self._evictable_at[level], admit=key) if evictable is None
                   else index.plan_room(self.chunk_bytes, evictable))
        if victims is not None:
            index.add(key, self.chunk_bytes)
            self._storing.add((level, key))
            for victim in victims:
                self._leaving.add((level, victim))
        return victims

    def complete_store(self, level: int, keys: Iterable[ChunkKey]) -> None:
        """The bytes are in: STORING -> PRESENT."""
        with self.lock:
            for key in keys:
                self._storing.discard((level, key))

    def abort_store(self, level: int, keys: Iterable[ChunkKey]) -> None:
        """The bytes are not coming: STORING -> ABSENT."""
        with self.lock:
            for key in keys:
                if (level, key) in self._storing:
                    self._storing.discard((level, key))
                    self.indexes[level].discard(key)

    # --- leave: PRESENT -> LEAVING -> ABSENT -----------------------------------------------
    def prepare_leave(self, level: int, keys: Sequence[ChunkKey], *,
                      evictable_only: bool = False) -> tuple[list[ChunkKey], list[ChunkKey]]:
        """Take ``keys`` out of tier ``level`` before their bytes go: (to delete, now LEAVING).

        A STORING chunk is left to its store (which counts as the later of the two); one LEAVING
        already is deleted again but completed by whoever marked it.  ``evictable_only``: only
        indexed chunks that may be victims (pinned ones stay).
        """
        with self.lock:
            index = self.indexes[level]
            if evictable_only and len(keys) == 1:  # the per-chunk path (exclusive promotions): no copies
                key = keys[0]
                if key not in index.sizes or not self.evictable(level, key) or (level, key) in self._leaving:
                    return [], []
                index.discard(key)
                self._leaving.add((level, key))
                return [key], [key]
            if evictable_only:
                gone = [k for k in dict.fromkeys(keys) if k in index and self.evictable(level, k)
                        and (level, k) not in self._leaving]
            else:
                gone = [k for k in dict.fromkeys(keys) if (level, k) not in self._storing]
            marked = [k for k in gone if (level, k) not in self._leaving]
            for key in gone:
                index.discard(key)
            self._leaving.update((level, k) for k in marked)
        return gone, marked

    def complete_leave(self, level: int, keys: Iterable[ChunkKey]) -> None:
        """The bytes are gone (or moved below): LEAVING -> ABSENT."""
        with self.lock:
            for key in keys:
                self._leaving.discard((level, key))

    def forget(self, level: int, key: ChunkKey, still_there: Callable[[], bool]) -> None:
        """A read from tier ``level`` failed: drop ``key`` from its index, unless a store put it
        back since (STORING, or ``still_there()``, asked under the lock)."""
        with self.lock:
            if (level, key) in self._storing or still_there():
                return
            self.indexes[level].discard(key)

    # --- load: readers ----------------------------------------------------------------------
    def prepare_load(self, keys: Sequence[ChunkKey], levels: Sequence[int], *,
                     top_slots: bool = True) -> tuple[list[ChunkKey], list[int]]:
        """Hold a prefix found by ``lookup`` (plus probes) for reading: no top-tier victims until
        ``complete_load``.  A top-tier chunk evicted since is served from the tier it went to, or
        ends the prefix.  Returns the prefix held and the level of each."""
        keys, levels = list(keys), list(levels)
        with self.lock:
            top = self.indexes[0]
            for i, key in enumerate(keys):
                if levels[i] == 0 and top_slots and key not in top:
                    level = self._locate(key, below=0)
                    if level is None:
                        del keys[i:], levels[i:]
                        break
                    levels[i] = level
            self._readers.update(keys)
        return keys, levels

    def complete_load(self, keys: Sequence[ChunkKey]) -> None:
        """Release what ``prepare_load`` held."""
        with self.lock:
            self._readers -= Counter(keys)

    def record_load(self, keys: Sequence[ChunkKey], levels: Sequence[int],
                    adoptable: Callable[[int, ChunkKey], bool]) -> None:
        """``keys[i]`` was served from tier ``levels[i]``: refresh the eviction order there and of
        the copies below (``EvictionPolicy.access_above``).  A chunk the tier's index lacks (another
        process wrote it) is adopted if it fits, is not LEAVING and ``adoptable(level, key)``."""
        below = [self.indexes[level + 1:] for level in range(len(self.indexes))]
        with self.lock:
            for key, level in zip(keys, levels, strict=False):
                index = self.indexes[level]
                if key in index.sizes:
                    index.touch(key)
                elif (index.used_bytes + self.chunk_bytes <= index.capacity_bytes
                      and (level, key) not in self._leaving and adoptable(level, key)):
                    index.add(key, self.chunk_bytes)
                for lower in below[level]:
                    if key in lower.sizes:
                        lower.touch_copy(key)

    def reconcile(self, level: int, capacity_bytes: int, listed: Collection[ChunkKey]) -> list[ChunkKey]:
        """A survey of a shared tier listed ``listed``: adopt what others wrote, set the room left
        for this index; returns the indexed chunks it did not list (not STORING): gone, perhaps."""
        index = self.indexes[level]
        with self.lock:
            index.capacity_bytes = max(0, capacity_bytes)
            for key in listed:
                if key not in index.sizes and (level, key) not in self._leaving:
                    index.add(key, self.chunk_bytes)
            return [k for k in index.sizes if k not in listed and (level, k) not in self._storing]

    def adopt(self, level: int, keys: Iterable[ChunkKey]) -> None:
        """Chunks tier ``level`` holds already (found at open): PRESENT, in the order given."""
        with self.lock:
            for key in keys:
                self.indexes[level].add(key, self.chunk_bytes)

    def drop(self, level: int, keys: Iterable[ChunkKey]) -> None:
        """Chunks found gone from tier ``level`` (a survey): out of its index, unless STORING."""
        with self.lock:
            for key in keys:
                if (level, key) not in self._storing:
                    self.indexes[level].discard(key)

    # --- pins and hints ---------------------------------------------------------------------
    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None) -> None:
        with self.lock:
            self.pins.pin(keys, ttl_s)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self.lock:
            self.pins.unpin(keys)

    def pinned(self, key: ChunkKey) -> bool:
        """Pinned by this process or by a persistent record?"""
        with self.lock:
            return key in self.pins or (self.pin_records is not None and key in self.pin_records)

    def persist_share(self, keys: Sequence[ChunkKey], share: float) -> list[ChunkKey]:
        """What an exclusive hierarchy writes through: pinned chunks and the batch's leading share."""
        lead = math.ceil(len(keys) * share)
        with self.lock:
            return [key for i, key in enumerate(keys) if i < lead or self.pinned(key)]

    def observe(self, keys: Sequence[ChunkKey], *, session: str | None, now: float | None,
                retention: Retention | None) -> None:
        with self.lock:
            self.indexes[0].policy.observe(keys, session=session, now=now, retention=retention)

    def observe_end(self, session: str, *, awaits: str) -> None:
        with self.lock:
            self.indexes[0].policy.observe_end(session, awaits=awaits)

    def listen(self, callback: Callable[[str, ChunkKey, bool], None]) -> None:
        """Call ``callback(tier name, key, added)`` for every indexed chunk now and each change after."""
        with self.lock:
            for index in self.indexes:
                for key in list(index.sizes):
                    callback(index.name, key, True)
                index.on_change = callback
