"""Tier capabilities: declared by each class, and the hierarchy asks them instead of the class."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier.errors import TierError
from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.tiers.base import SharedRoot, Tier, TierCapabilities
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from kvtier.tiers.null import NullTier
from tests.conftest import make_keys, make_payloads
from tests.test_hierarchy import LAYOUT


class _Wrapped(Tier):
    """A tier of another class that delegates to a DRAM tier and declares what it can do."""

    name = "wrapped"
    capabilities = DramTier.capabilities

    def __init__(self, inner: Tier) -> None:
        super().__init__(inner.layout)
        self.inner = inner

    @property
    def pool(self) -> Any:
        return self.inner.pool

    def shared_root(self) -> SharedRoot | None:
        return self.inner.shared_root()

    @property
    def capacity_bytes(self) -> int:
        return self.inner.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        return self.inner.put(key, payload)

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        return self.inner.get_into(key, out)

    def contains(self, key: ChunkKey) -> bool:
        return self.inner.contains(key)

    def delete(self, key: ChunkKey) -> bool:
        return self.inner.delete(key)

    def keys(self) -> Iterator[ChunkKey]:
        return self.inner.keys()

    def borrow(self, key: ChunkKey) -> AbstractContextManager[np.ndarray | None]:
        return self.inner.borrow(key)

    def reserve(self, keys: Sequence[ChunkKey]) -> list[np.ndarray] | None:
        return self.inner.reserve(keys)

    def commit(self, keys: Sequence[ChunkKey]) -> None:
        self.inner.commit(keys)

    def abort(self, keys: Sequence[ChunkKey]) -> None:
        self.inner.abort(keys)


class _WrappedDisk(_Wrapped):
    """The same over a disk tier: it offers the disk's shared root."""

    capabilities = DiskTier.capabilities


def test_built_in_tiers_declare_their_capabilities() -> None:
    assert DramTier.capabilities == TierCapabilities(slots=True, zero_copy_borrow=True, authoritative_contains=True)
    assert DiskTier.capabilities == TierCapabilities(authoritative_contains=True, persistent=True, shared=True)
    assert NullTier.capabilities == TierCapabilities()  # the simulator's tier promises nothing
    assert (DiskTier.persistent, DiskTier.shared, DramTier.persistent) == (True, True, False)


def test_only_dram_offers_a_pool_and_only_disk_a_shared_root(tmp_path: Path) -> None:
    dram = DramTier(LAYOUT, capacity_bytes=LAYOUT.chunk_bytes, prefault=False)
    disk = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=1 << 20)
    null = NullTier(LAYOUT, capacity_bytes=LAYOUT.chunk_bytes, dummy=np.empty(0, np.uint8))
    try:
        assert dram.pool is not None and disk.pool is None and null.pool is None
        assert disk.shared_root() is disk and dram.shared_root() is None and null.shared_root() is None
    finally:
        disk.close()


def test_the_older_class_attributes_fold_into_capabilities() -> None:
    disk = NullTier.named("disk", persistent=True)
    assert disk.capabilities.persistent and disk.persistent and not disk.capabilities.shared

    class Legacy(NullTier):
        shared = True

    assert Legacy.capabilities == TierCapabilities(shared=True) and Legacy.shared


def test_a_tier_without_slots_refuses_reserve_by_name() -> None:
    tier = NullTier(LAYOUT, capacity_bytes=LAYOUT.chunk_bytes, dummy=np.empty(0, np.uint8))
    with pytest.raises(TierError, match="null tier has no slots"):
        tier.reserve(make_keys(LAYOUT, 1))


def test_a_tier_that_declares_slots_gets_in_place_stores_and_zero_copy_borrows(tmp_path: Path) -> None:
    inner = DramTier(LAYOUT, capacity_bytes=4 * LAYOUT.chunk_bytes, prefault=False)
    keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
    with ContextMemory(LAYOUT, [_Wrapped(inner), DiskTier(LAYOUT, path=tmp_path, capacity_bytes=1 << 20)],
                       write_through=False) as mem:
        with mem.store_in_place(keys) as op:
            assert op.num_in_place == 3  # slots of the inner pool, not spill buffers
            assert all(v is not None and np.shares_memory(v, inner.pool) for v in op.views)
            for view, payload in zip(op.views, payloads, strict=True):
                assert view is not None
                view[:] = payload
        with mem.borrow_prefix(keys) as views:
            assert len(views) == 3
            for view, payload in zip(views, payloads, strict=True):
                assert np.shares_memory(view, inner.pool) and not view.flags.writeable
                np.testing.assert_array_equal(view, payload)


def test_a_tier_that_offers_a_shared_root_is_surveyed_and_keeps_the_pins(tmp_path: Path) -> None:
    inner = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=1 << 20, survey_s=0.0)
    other = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=1 << 20)  # another process on the root
    keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
    with ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=4 * LAYOUT.chunk_bytes, prefault=False),
                                _WrappedDisk(inner)]) as mem:
        assert mem.pin_files is inner.pin_files
        assert other.put(keys[0], payloads[0])
        mem.store(keys[1:], payloads[1:])  # written through: the put surveys the root first
        mem.flush()
        assert mem.directory.indexed(1, keys[0])  # adopted from the other writer
    other.close()
