"""A payload-free tier for the trace simulator: it remembers keys and counts bytes, stores none.

It keeps the tier contract where the hierarchy can observe it (``put`` refuses past capacity,
``get_into`` misses on unknown keys, ``borrow`` yields a view only for held keys), so
``ContextMemory`` runs its real store/demote/promote code over it unchanged.  Reads leave the
caller's buffer untouched: there are no bytes.  ``bytes_read``/``bytes_written`` count what a
real tier would have moved.  ``named(..., slots=True)`` gives it slots (``reserve``/``commit``, as
``DramTier``: the hierarchy's in-place store and promotion path, and prefetch); the views are the
shared dummy, so a store of the dummy copies nothing.  Not registered in the tier registry: nothing should configure it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier, TierCapabilities


class NullTier(Tier):
    name = "null"

    def __init__(self, layout: KVLayout, *, capacity_bytes: int, dummy: np.ndarray) -> None:
        super().__init__(layout)
        self._chunk = layout.chunk_bytes  # cached: a property computed per call is hot here
        self._capacity = (capacity_bytes // self._chunk) * self._chunk
        self._keys: set[ChunkKey] = set()
        self._reserved: set[ChunkKey] = set()  # slots handed out, not committed yet
        self._dummy = dummy  # one chunk-sized array handed out by borrow(); never written

    @classmethod
    def named(cls, name: str, *, persistent: bool = False, slots: bool = False) -> type[NullTier]:
        """A subclass with its own ``name`` (tier stats are keyed by name), persistence and slots."""
        return type(f"NullTier_{name}", (cls,), {"name": name, "persistent": persistent,
                                                  "capabilities": TierCapabilities(slots=slots)})

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return (len(self._keys) + len(self._reserved)) * self._chunk

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        if key not in self._keys:
            if (len(self._keys) + len(self._reserved) + 1) * self._chunk > self._capacity:
                return False
            self._keys.add(key)
        self.stats.bytes_written += self._chunk
        return True

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        if key not in self._keys:
            return False
        self.stats.bytes_read += self._chunk
        return True

    def borrow(self, key: ChunkKey) -> AbstractContextManager[np.ndarray | None]:
        if key in self._keys:
            self.stats.bytes_read += self._chunk
            return nullcontext(self._dummy)
        return nullcontext(None)

    def contains(self, key: ChunkKey) -> bool:
        return key in self._keys

    def delete(self, key: ChunkKey) -> bool:
        if key in self._keys:
            self._keys.discard(key)
            return True
        return False

    def keys(self) -> Iterator[ChunkKey]:
        return iter(list(self._keys))

    def reserve(self, keys: Sequence[ChunkKey]) -> list[np.ndarray] | None:
        if not self.capabilities.slots:
            return super().reserve(keys)
        new = set(keys) - self._keys - self._reserved
        if (len(self._keys) + len(self._reserved) + len(new)) * self._chunk > self._capacity:
            return None
        self._reserved |= new
        return [self._dummy] * len(keys)

    def commit(self, keys: Sequence[ChunkKey]) -> None:
        if not self.capabilities.slots:
            return super().commit(keys)
        done = self._reserved.intersection(keys)
        self._reserved -= done
        self._keys |= done
        self.stats.bytes_written += len(done) * self._chunk
        return None

    def abort(self, keys: Sequence[ChunkKey]) -> None:
        if not self.capabilities.slots:
            return super().abort(keys)
        self._reserved.difference_update(keys)
        return None
