"""``kvtier.testing``: an out-of-tree tier, written against the public ``Tier`` interface only,
passes the shipped conformance suite, and the suite catches a tier that breaks the contract."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from kvtier.errors import LayoutError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.testing import TierConformance, make_keys, make_payloads, small_layout
from kvtier.tiers.base import Tier


class DictTier(Tier):
    """What a user might write: chunks in a dict, a byte budget."""

    name = "dict"

    def __init__(self, layout: KVLayout, capacity: int) -> None:
        super().__init__(layout)
        self._chunks: dict[ChunkKey, bytes] = {}
        self._capacity = capacity

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return len(self._chunks) * self.layout.chunk_bytes

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        if payload.nbytes != self.layout.chunk_bytes:
            raise LayoutError(f"a chunk is {self.layout.chunk_bytes} bytes, got {payload.nbytes}")
        if key not in self._chunks and not self.has_room(payload.nbytes):
            return False
        self._chunks[key] = payload.tobytes()
        return True

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        data = self._chunks.get(key)
        if data is None:
            return False
        out[:] = np.frombuffer(data, dtype=np.uint8)
        return True

    def contains(self, key: ChunkKey) -> bool:
        return key in self._chunks

    def delete(self, key: ChunkKey) -> bool:
        return self._chunks.pop(key, None) is not None

    def keys(self) -> Iterator[ChunkKey]:
        return iter(list(self._chunks))


class TestDictTier(TierConformance):
    @pytest.fixture
    def tier(self, layout: KVLayout) -> Iterator[Tier]:
        tier = DictTier(layout, capacity=16 * layout.chunk_bytes)
        yield tier
        tier.close()


class CountsOverwritesTwice(DictTier):
    def __init__(self, layout: KVLayout, capacity: int) -> None:
        super().__init__(layout, capacity)
        self._puts = 0

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        self._puts += 1
        return super().put(key, payload)

    @property
    def used_bytes(self) -> int:  # the defect: every put counted, overwrites and deletes included
        return self._puts * self.layout.chunk_bytes


def test_the_suite_catches_a_tier_that_breaks_the_contract() -> None:
    layout = small_layout()
    suite = TierConformance()
    suite.test_put_get_roundtrip(CountsOverwritesTwice(layout, 1 << 20), layout)  # most of it still holds
    with pytest.raises(AssertionError):
        suite.test_usage_accounting(CountsOverwritesTwice(layout, 1 << 20), layout)


def test_the_helpers_make_distinct_keys_and_full_payloads() -> None:
    layout = small_layout()
    keys, payloads = make_keys(layout, 5), make_payloads(layout, 5)
    assert len(set(keys)) == 5 and make_keys(layout, 5, tenant="t") != keys
    assert all(p.nbytes == layout.chunk_bytes and p.dtype == np.uint8 for p in payloads)
