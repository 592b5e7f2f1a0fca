from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from kvtier.layout import KVLayout
from kvtier.testing import TierConformance
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads


class TestDramTier(TierConformance):
    @pytest.fixture
    def tier(self, layout: KVLayout) -> Iterator[DramTier]:
        t = DramTier(layout, capacity_bytes=16 * layout.chunk_bytes, pin_memory=False)
        yield t
        t.close()


def test_full_pool_refuses_and_keeps_old_chunks(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=2 * small_layout.chunk_bytes + 7)
    assert tier.capacity_bytes == 2 * small_layout.chunk_bytes  # whole slots only
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    assert tier.put(keys[0], payloads[0]) and tier.put(keys[1], payloads[1])
    assert not tier.put(keys[2], payloads[2])
    out = np.empty(small_layout.chunk_bytes, np.uint8)
    assert tier.get_into(keys[0], out)
    np.testing.assert_array_equal(out, payloads[0])


def test_borrowed_slot_is_not_reused_until_released(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    tier.put(keys[0], payloads[0])
    with tier.borrow(keys[0]) as view:
        assert view is not None and not view.flags.writeable
        tier.delete(keys[0])
        assert not tier.put(keys[1], payloads[1])  # the only slot is still being read
        np.testing.assert_array_equal(view, payloads[0])
    assert tier.put(keys[1], payloads[1])


def test_views_share_the_pool_memory(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=4 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    tier.put(keys[0], payloads[0])
    slot = tier.slot_of(keys[0])
    assert slot is not None
    with tier.borrow(keys[0]) as view:
        assert view is not None
        assert np.shares_memory(view, np.asarray(tier.pool))
