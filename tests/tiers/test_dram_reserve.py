"""DramTier's in-place writes: reserve a slot, write into it, commit (or abort)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads


def test_reserved_slots_are_invisible_until_commit(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=4 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    views = tier.reserve(keys)
    assert views is not None and len(views) == 2
    assert all(v.flags.writeable and v.nbytes == small_layout.chunk_bytes for v in views)
    assert all(np.shares_memory(v, np.asarray(tier.pool)) for v in views)  # the pool itself, no staging
    assert not np.shares_memory(views[0], views[1])
    assert tier.used_bytes == 2 * small_layout.chunk_bytes  # reserved slots are taken
    for view, payload in zip(views, payloads, strict=True):
        view[:] = payload
    out = np.empty(small_layout.chunk_bytes, np.uint8)
    for key in keys:  # written, not committed: nobody sees them
        assert not tier.contains(key) and not tier.get_into(key, out) and tier.slot_of(key) is None
        with tier.borrow(key) as view:
            assert view is None
    assert list(tier.keys()) == [] and tier.stats.bytes_written == 0
    tier.commit(keys)
    assert set(tier.keys()) == set(keys)
    for key, payload in zip(keys, payloads, strict=True):
        assert tier.get_into(key, out)
        np.testing.assert_array_equal(out, payload)
    assert tier.stats.bytes_written == 2 * small_layout.chunk_bytes


def test_fresh_slots_are_consecutive(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=8 * small_layout.chunk_bytes)
    keys = make_keys(small_layout, 4)
    assert tier.reserve(keys) is not None
    tier.commit(keys)
    assert [tier.slot_of(k) for k in keys] == [0, 1, 2, 3]
    tier.delete(keys[2])
    tier.delete(keys[0])
    more = make_keys(small_layout, 2, seed=1)
    assert tier.reserve(more) is not None
    tier.commit(more)
    assert [tier.slot_of(k) for k in more] == [0, 2]  # ascending, whatever order they were freed in
    for key in [*keys[1:2], *keys[3:], *more]:
        tier.delete(key)
    payloads = make_payloads(small_layout, 4)
    assert all(tier.put(k, p) for k, p in zip(keys, payloads, strict=True))  # put, too: lowest free first
    assert [tier.slot_of(k) for k in keys] == [0, 1, 2, 3]


def test_abort_frees_the_slots(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=2 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    views = tier.reserve(keys)
    assert views is not None
    views[0][:] = payloads[0]
    assert tier.reserve(make_keys(small_layout, 1, seed=3)) is None  # the pool is all reserved
    tier.abort(keys)
    assert tier.used_bytes == 0 and not tier.contains(keys[0])
    assert tier.put(keys[0], payloads[0]) and tier.put(keys[1], payloads[1])
    tier.abort(keys)  # no longer reserved: ignored, the stored chunks stay
    assert tier.contains(keys[0]) and tier.contains(keys[1])


def test_full_pool_refuses_and_changes_nothing(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=2 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    assert tier.put(keys[0], payloads[0])
    assert tier.reserve(keys[1:]) is None  # 2 wanted, 1 free: all or nothing, no victim picked
    assert tier.contains(keys[0]) and tier.used_bytes == small_layout.chunk_bytes
    views = tier.reserve(keys[1:2])
    assert views is not None
    views[0][:] = payloads[1]
    tier.commit(keys[1:2])
    assert tier.reserve(keys[2:]) is None
    assert not tier.put(keys[2], payloads[2])


def test_misuse_is_an_error(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=4 * small_layout.chunk_bytes)
    keys = make_keys(small_layout, 2)
    with pytest.raises(ValueError, match="duplicate"):
        tier.reserve([keys[0], keys[0]])
    assert tier.reserve(keys[:1]) is not None
    with pytest.raises(ValueError, match="already reserved"):
        tier.reserve(keys)
    with pytest.raises(KeyError):
        tier.commit(keys)  # keys[1] was never reserved: nothing is published
    assert not tier.contains(keys[0])
    tier.commit(keys[:1])
    assert tier.contains(keys[0]) and tier.used_bytes == small_layout.chunk_bytes


def test_reserving_block_commits_or_aborts(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=2 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    with pytest.raises(RuntimeError), tier.reserving(keys[:1]) as views:
        assert views is not None
        raise RuntimeError("the producer failed")
    assert tier.used_bytes == 0 and not tier.contains(keys[0])
    with tier.reserving(keys) as views:
        assert views is not None
        for view, payload in zip(views, payloads, strict=True):
            view[:] = payload
    out = np.empty(small_layout.chunk_bytes, np.uint8)
    assert tier.get_into(keys[1], out)
    np.testing.assert_array_equal(out, payloads[1])
    with tier.reserving(make_keys(small_layout, 1, seed=9)) as views:
        assert views is None  # full: refused, nothing to commit


def test_commit_over_a_borrowed_chunk_keeps_the_reader_safe(small_layout: KVLayout) -> None:
    tier = DramTier(small_layout, capacity_bytes=2 * small_layout.chunk_bytes)
    key, (old, new) = make_keys(small_layout, 1)[0], make_payloads(small_layout, 2)
    assert tier.put(key, old)
    with tier.borrow(key) as view:
        assert view is not None
        slots = tier.reserve([key])  # the same key again, written in place elsewhere
        assert slots is not None
        slots[0][:] = new
        tier.commit([key])
        np.testing.assert_array_equal(view, old)  # the reader's slot is untouched...
        assert tier.used_bytes == 2 * small_layout.chunk_bytes  # ...and not reused while borrowed
        assert tier.reserve(make_keys(small_layout, 1, seed=4)) is None
    assert tier.used_bytes == small_layout.chunk_bytes  # freed when the borrow ended
    out = np.empty(small_layout.chunk_bytes, np.uint8)
    assert tier.get_into(key, out)
    np.testing.assert_array_equal(out, new)


def test_concurrent_borrows_never_see_unfinished_or_reused_slots(small_layout: KVLayout) -> None:
    """Writers reserve, fill slowly, commit, delete; readers borrow: every view they get is whole."""
    tier = DramTier(small_layout, capacity_bytes=3 * small_layout.chunk_bytes)
    keys = make_keys(small_layout, 6, seed=7)
    payload = {k: np.full(small_layout.chunk_bytes, i + 1, np.uint8) for i, k in enumerate(keys)}
    stop = threading.Event()
    errors: list[str] = []
    seen = [0]

    def writer(mine: list[ChunkKey]) -> None:
        live: ChunkKey | None = None  # the last committed chunk stays readable until the next one
        for _ in range(300):
            for key in mine:
                views = tier.reserve([key])
                if views is None:  # the other writer and the readers hold the slots: try the next
                    continue
                half = small_layout.chunk_bytes // 2
                views[0][:half] = payload[key][:half]
                views[0][half:] = 0  # a reader would see this if it got an unfinished slot
                views[0][half:] = payload[key][half:]
                tier.commit([key])
                if live is not None and live != key:
                    tier.delete(live)
                live = key
        if live is not None:
            tier.delete(live)

    def reader() -> None:
        while not stop.is_set():
            for key in keys:
                with tier.borrow(key) as view:
                    if view is None:
                        continue
                    first = view.copy()
                    for _ in range(3):  # a slot reused under the view would change its bytes
                        if not np.array_equal(view, first):
                            errors.append("a borrowed slot changed")
                    if not np.array_equal(first, payload[key]):
                        errors.append("a borrow saw bytes that are not the committed chunk")
                    seen[0] += 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(keys[i::2],)) for i in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert seen[0] > 0  # the readers did read committed chunks
    assert tier.used_bytes == 0 and not tier._reserved and not tier._borrows and not tier._dead
    assert len(tier._free) == 3
