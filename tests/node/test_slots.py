"""The service's slot table alone: states, ownership, reclaim and eviction (no sockets, no bytes)."""

from __future__ import annotations

import pytest

from kvtier.layout import KVLayout
from kvtier.node.slots import HELD, NO_ROOM, SlotError, SlotTable
from tests.conftest import make_keys

A, B = 1, 2  # two clients


def test_a_reserved_slot_is_invisible_until_committed(small_layout: KVLayout) -> None:
    table, keys = SlotTable(4), make_keys(small_layout, 2)
    slots = table.reserve(A, keys)
    assert slots == [0, 1]
    assert table.lookup(keys) == [False, False] and table.acquire(B, keys) == [NO_ROOM, NO_ROOM]
    assert table.reserve(B, keys) == [NO_ROOM, NO_ROOM]  # one writer per key
    table.commit(A, slots)
    assert table.lookup(keys) == [True, True]
    assert table.reserve(B, keys) == [HELD, HELD]  # held already: nothing to write


def test_only_the_owner_commits_or_aborts(small_layout: KVLayout) -> None:
    table, keys = SlotTable(4), make_keys(small_layout, 1)
    slots = table.reserve(A, keys)
    with pytest.raises(SlotError):
        table.commit(B, slots)
    with pytest.raises(SlotError):
        table.abort(A, [3])
    with pytest.raises(SlotError):
        table.release(A, slots)  # never acquired
    table.abort(A, slots)
    assert table.stats()["free"] == 4 and table.lookup(keys) == [False]


def test_a_gone_owner_publishes_nothing_and_its_pins_go(small_layout: KVLayout) -> None:
    table, keys = SlotTable(4), make_keys(small_layout, 3)
    table.commit(A, table.reserve(A, keys[:1]))
    assert table.acquire(B, keys[:1]) == [0]
    table.reserve(B, keys[1:])  # B dies mid-copy
    assert table.reclaim(B) == (2, 1)
    assert table.lookup(keys) == [True, False, False]
    stats = table.stats()
    assert (stats["free"], stats["reserved"], stats["pinned"]) == (3, 0, 0)
    assert (stats["reclaimed_reservations"], stats["reclaimed_pins"]) == (2, 1)
    assert table.reserve(A, keys[1:]) == [1, 2]  # the slots are usable again


def test_a_deleted_slot_under_a_reader_waits_for_its_release(small_layout: KVLayout) -> None:
    table, keys = SlotTable(1), make_keys(small_layout, 2)
    table.commit(A, table.reserve(A, keys[:1]))
    (slot,) = table.acquire(B, keys[:1])
    assert table.delete(keys[:1]) == [True] and table.lookup(keys[:1]) == [False]
    assert table.reserve(A, keys[1:]) == [NO_ROOM]  # DEAD, not reused under the reader
    table.release(B, [slot])
    assert table.reserve(A, keys[1:]) == [slot]


def test_eviction_is_lru_and_skips_pinned_and_reserved(small_layout: KVLayout) -> None:
    table, keys = SlotTable(3), make_keys(small_layout, 6)
    for key in keys[:3]:
        table.commit(A, table.reserve(A, [key]))
    table.acquire(B, [keys[0]])  # the oldest is read: pinned, and now the newest
    table.commit(A, table.reserve(A, [keys[3]]))  # evicts keys[1], the least recent unpinned
    assert table.lookup(keys[:4]) == [True, False, True, True]
    assert table.reserve(A, [keys[4]]) == [2]  # evicts keys[2]; keys[4] stays reserved
    assert table.reserve(A, [keys[5]]) == [1]  # keys[0] is pinned, keys[4] reserved: keys[3] goes
    assert table.lookup(keys) == [True, False, False, False, False, False]
    assert table.stats()["evictions"] == 3


def test_nothing_evictable_is_no_room(small_layout: KVLayout) -> None:
    table, keys = SlotTable(2), make_keys(small_layout, 3)
    table.commit(A, table.reserve(A, keys[:1]))
    table.acquire(B, keys[:1])
    table.reserve(A, keys[1:2])
    assert table.reserve(A, keys[2:]) == [NO_ROOM]
    assert table.stats()["evictions"] == 0
