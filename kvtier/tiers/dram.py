"""G2: host DRAM, one pre-allocated pool cut into chunk-sized slots.

Bytes: one contiguous buffer of ``num_slots * layout.chunk_bytes`` allocated once at start
(page-locked ``torch`` memory when CUDA is available, so GPU copies run at full PCIe speed and
need no staging; otherwise plain memory, populated up front by the kernel -- ``kvtier.hostmem``:
first-touch page faults would otherwise land on the first store or promotion into each slot).
A chunk occupies one slot; a free list (lowest slot first) hands slots out, so the hot path
never calls ``malloc``.  Payloads are stored bare (no header): they never leave the process.

Views: ``borrow(key)`` yields a read-only view of a slot without copying.  While a view is
borrowed the slot is not reused: a delete during a borrow frees the slot when the last borrow
ends.  This is what makes zero-copy safe for asynchronous writers (disk write-through, GPU
copies).

In-place writes: ``reserve(keys)`` hands out writable views of free slots, *invisible* to
``get_into``/``contains``/``keys``/``borrow`` until ``commit(keys)`` publishes them (``abort``
returns them to the free list).  A producer (the GPU copy engine) writes each chunk straight
into its slot: no staging buffer, no host memcpy.  Like ``put``, a reserve that does not fit is
refused (None): the tier never picks victims.

Not persistent: a restart starts empty (the disk tier below is the persistent copy).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvtier.hostmem import populated
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier, TierCapabilities


def _allocate(nbytes: int, pin: bool | None, prefault: bool = True) -> tuple[np.ndarray, Any]:
    """Return (numpy view, owner). Pinned through torch when asked for or when CUDA is up;
    otherwise populated up front (``kvtier.hostmem``) unless ``prefault`` is False."""
    if pin is not False:
        try:
            import torch

            if pin or torch.cuda.is_available():
                tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                return tensor.numpy(), tensor
        except (ImportError, RuntimeError):
            if pin:
                raise
    array = populated(nbytes) if prefault else np.empty(nbytes, dtype=np.uint8)
    return array, array


class DramTier(Tier):
    name = "dram"
    capabilities = TierCapabilities(slots=True, zero_copy_borrow=True, authoritative_contains=True)

    def __init__(self, layout: KVLayout, *, capacity_bytes: int, pin_memory: bool | None = None,
                 prefault: bool = True) -> None:
        super().__init__(layout)
        self._slot_bytes = layout.chunk_bytes
        self._num_slots = capacity_bytes // self._slot_bytes
        self._pool, self._owner = _allocate(self._num_slots * self._slot_bytes, pin_memory, prefault)
        self.pinned = self._owner is not self._pool
        # free slots as a min-heap: the lowest free slot goes first, so chunks stored together
        # land in consecutive slots (one device copy per run) also after evictions freed others
        self._free = list(range(self._num_slots))
        self._slots: dict[ChunkKey, int] = {}
        self._borrows: dict[int, int] = {}  # slot -> number of live views
        self._dead: set[int] = set()  # deleted while borrowed: freed by the last view
        self._reserved: dict[ChunkKey, int] = {}  # slots being written in place: invisible
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self._num_slots * self._slot_bytes

    @property
    def used_bytes(self) -> int:
        return (self._num_slots - len(self._free)) * self._slot_bytes

    @property
    def pool(self) -> Any:
        """The whole pool (a pinned torch tensor when pinned, else a numpy array)."""
        return self._owner

    def slot_of(self, key: ChunkKey) -> int | None:
        """Slot index of a chunk, for engines that copy straight from ``pool``."""
        return self._slots.get(key)

    def _slot(self, index: int) -> np.ndarray:
        return self._pool[index * self._slot_bytes:(index + 1) * self._slot_bytes]

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        self.layout.check_payload(payload)
        with self._lock:
            index = self._slots.get(key)
            if index is None:
                if not self._free:
                    return False
                index = heapq.heappop(self._free)
            elif self._borrows.get(index):
                return True  # same key = same prefix = same bytes: a reader holds them already
            np.copyto(self._slot(index), payload)
            self._slots[key] = index
        self.stats.bytes_written += payload.nbytes
        return True

    # --- in-place writes: reserve, write into the slot, commit (or abort) -----------------------
    def reserve(self, keys: Sequence[ChunkKey]) -> list[np.ndarray] | None:
        """Writable views of one free slot per key, or None (nothing reserved) if they do not fit.

        The slots stay invisible to readers until ``commit``; ``abort`` frees them.  Slots are
        the lowest free ones, in ascending order, so they tend to be consecutive (one device copy
        per run).  A key may be reserved once at a time; reserving a key that is already stored is
        allowed (the commit replaces it, as ``put`` would).
        """
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError("reserve: duplicate keys")
        with self._lock:
            if any(key in self._reserved for key in keys):
                raise ValueError("reserve: a key is already reserved and not yet committed")
            if len(keys) > len(self._free):
                return None
            slots = [heapq.heappop(self._free) for _ in keys]  # ascending
            self._reserved.update(zip(keys, slots, strict=True))
        return [self._slot(index) for index in slots]

    def commit(self, keys: Sequence[ChunkKey]) -> None:
        """Publish reserved slots (their bytes must be written); replaces older copies of a key."""
        with self._lock:
            indexes = [self._reserved[key] for key in keys]  # KeyError: not reserved, nothing changes
            for key, index in zip(keys, indexes, strict=True):
                del self._reserved[key]
                old = self._slots.get(key)
                if old is not None:  # stored meanwhile (put): same key = same bytes; keep the newest slot
                    self._release(old)
                self._slots[key] = index
        self.stats.bytes_written += len(indexes) * self._slot_bytes

    def abort(self, keys: Sequence[ChunkKey]) -> None:
        """Give reserved slots back to the free list, unpublished (unknown keys are ignored)."""
        with self._lock:
            for key in keys:
                index = self._reserved.pop(key, None)
                if index is not None:
                    heapq.heappush(self._free, index)

    @contextmanager
    def reserving(self, keys: Sequence[ChunkKey]) -> Iterator[list[np.ndarray] | None]:
        """``reserve`` as a block: commit when it ends normally, abort when it raises."""
        views = self.reserve(keys)
        try:
            yield views
        except BaseException:
            if views is not None:
                self.abort(keys)
            raise
        if views is not None:
            self.commit(keys)

    def _release(self, index: int) -> None:
        """Free a slot no key points to any more (later, if a view still reads it). Under the lock."""
        if self._borrows.get(index):
            self._dead.add(index)
        else:
            heapq.heappush(self._free, index)

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        with self.borrow(key) as view:
            if view is None:
                return False
            np.copyto(out[:view.nbytes], view)
        self.stats.bytes_read += self._slot_bytes
        return True

    @contextmanager
    def borrow(self, key: ChunkKey) -> Iterator[np.ndarray | None]:
        """A read-only zero-copy view of the chunk (None on a miss), valid inside the block."""
        with self._lock:
            index = self._slots.get(key)
            if index is None:
                view = None
            else:
                self._borrows[index] = self._borrows.get(index, 0) + 1
                view = self._slot(index)
                view = view.view()
                view.flags.writeable = False
        try:
            yield view
        finally:
            if index is not None:
                with self._lock:
                    self._borrows[index] -= 1
                    if not self._borrows[index]:
                        del self._borrows[index]
                        if index in self._dead:
                            self._dead.discard(index)
                            heapq.heappush(self._free, index)

    def contains(self, key: ChunkKey) -> bool:
        return key in self._slots

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            index = self._slots.pop(key, None)
            if index is None:
                return False
            self._release(index)
            return True

    def keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            return iter(list(self._slots))
