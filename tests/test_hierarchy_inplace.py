"""ContextMemory.store_in_place: the caller writes chunk bytes straight into top-tier slots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtier.hierarchy import ContextMemory
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import flip_byte, make_keys, make_payloads
from tests.test_hierarchy import LAYOUT, _memory, _outs


def _fill(op_views: list[np.ndarray | None], payloads: list[np.ndarray]) -> None:
    for view, payload in zip(op_views, payloads, strict=True):
        if view is not None:
            view[:] = payload


def test_in_place_chunks_appear_only_at_commit(tmp_path: Path) -> None:
    with _memory(tmp_path, 4, 100, write_through=False) as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
        op = mem.store_in_place(keys)
        assert op.num_in_place == 3
        assert all(v is not None and np.shares_memory(v, np.asarray(dram.pool)) for v in op.views)
        _fill(op.views, payloads)
        assert mem.lookup(keys).num_chunks == 0  # pending: not reported, not served
        assert mem.load(keys, _outs(3)) == 0
        assert op.commit() == 3 and op.stored == 3
        assert mem.lookup(keys).tiers == (0, 0, 0)
        outs = _outs(3)
        assert mem.load(keys, outs) == 3
        for out, payload in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(out, payload)
        assert dram.stats.bytes_written == 3 * LAYOUT.chunk_bytes and dram.stats.hits == 3
        assert mem.usage()["dram"][0] == 3 * LAYOUT.chunk_bytes == dram.used_bytes
        with pytest.raises(RuntimeError):
            op.commit()


def test_in_place_store_demotes_victims(tmp_path: Path) -> None:
    """Same outcome as store: the oldest chunks go down to disk to make room, none is lost."""
    with _memory(tmp_path, 2, 100, write_through=False) as mem:
        keys, payloads = make_keys(LAYOUT, 5), make_payloads(LAYOUT, 5)
        mem.store(keys[:2], payloads[:2])
        with mem.store_in_place(keys[2:4]) as op:
            assert op.num_in_place == 2
            _fill(op.views, payloads[2:4])
        assert op.stored == 2
        stats = mem.stats()
        assert stats["dram"].evictions == 2 and stats["dram"].demotions == 2
        assert mem.lookup(keys[:4]).tiers == (1, 1, 0, 0)
        with mem.store_in_place(keys[4:]) as op:  # one more: evicts the least recently used
            _fill(op.views, payloads[4:])
        assert mem.lookup(keys).tiers == (1, 1, 1, 0, 0)
        outs = _outs(5)
        assert mem.load(keys, outs) == 5
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))


def test_more_chunks_than_the_top_tier_end_as_with_store(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 5), make_payloads(LAYOUT, 5)
    with _memory(tmp_path / "a", 2, 100, write_through=False) as mem:
        mem.store(keys, payloads)
        want = mem.lookup(keys).tiers
    with _memory(tmp_path / "b", 2, 100, write_through=False) as mem, mem.store_in_place(keys) as op:
        _fill(op.views, payloads)
    assert op.stored == 5
    assert mem.lookup(keys).tiers == want == (1, 1, 1, 0, 0)


def test_write_through_starts_at_commit(tmp_path: Path) -> None:
    with _memory(tmp_path, 4, 100, write_through=True) as mem:
        disk = mem.tiers[1]
        keys, payloads = make_keys(LAYOUT, 2), make_payloads(LAYOUT, 2)
        op = mem.store_in_place(keys)
        _fill(op.views, payloads)
        mem.flush()
        assert not any(disk.contains(k) for k in keys)  # nothing persisted before the commit
        op.commit()
        mem.flush()
        assert all(disk.contains(k) for k in keys)
        out = np.empty(LAYOUT.chunk_bytes, np.uint8)
        assert disk.get_into(keys[1], out)
        np.testing.assert_array_equal(out, payloads[1])
    with _memory(tmp_path, 4, 100) as mem:  # a restart finds them on disk
        assert mem.lookup(keys).tiers == (1, 1)


def test_abort_stores_nothing(tmp_path: Path) -> None:
    with _memory(tmp_path, 2, 100, write_through=True) as mem:
        keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
        mem.store(keys[:1], payloads[:1])
        mem.flush()
        with pytest.raises(RuntimeError), mem.store_in_place(keys[1:]) as op:
            _fill(op.views, payloads[1:])
            raise RuntimeError("the device copy failed")
        mem.flush()
        assert mem.lookup(keys[1:2]).num_chunks == 0 and mem.lookup(keys[2:]).num_chunks == 0
        assert mem.lookup(keys[:1]).num_chunks == 1  # the victim was demoted, not lost
        assert mem.tiers[0].used_bytes == 0 and mem.usage()["dram"][0] == 0
        assert not mem.tiers[1].contains(keys[1])
        op.abort()  # twice: harmless


def test_chunks_held_already_need_no_bytes(tmp_path: Path) -> None:
    with _memory(tmp_path, 4, 100, write_through=False) as mem:
        keys, payloads = make_keys(LAYOUT, 2), make_payloads(LAYOUT, 2)
        mem.store(keys[:1], payloads[:1])
        with mem.store_in_place([keys[0], keys[1], keys[1]]) as op:
            assert op.views[0] is None and op.views[2] is None and op.num_in_place == 1
            _fill(op.views, [payloads[0], payloads[1], payloads[1]])
        assert op.stored == 3  # as store counts them
        assert mem.tiers[0].stats.bytes_written == 2 * LAYOUT.chunk_bytes


def test_pinned_top_tier_falls_back_to_the_copy_path(tmp_path: Path) -> None:
    with _memory(tmp_path, 2, 100, write_through=False) as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
        mem.store(keys[:2], payloads[:2])
        mem.pin(keys[:2])
        with mem.store_in_place(keys[2:]) as op:
            view = op.views[0]
            assert view is not None and not np.shares_memory(view, np.asarray(dram.pool))
            assert op.num_in_place == 0
            _fill(op.views, payloads[2:])
        assert op.stored == 1
        assert mem.lookup(keys).tiers == (0, 0, 1)  # as store: it went below the pinned tier
        out = _outs(1)
        assert mem.load(keys[2:], out) == 1
        np.testing.assert_array_equal(out[0], payloads[2])


def test_victim_still_borrowed_falls_back_to_the_copy_path(tmp_path: Path) -> None:
    """Room made in the index but the freed slot is still read: the tier refuses, as put would."""
    with _memory(tmp_path, 1, 100, write_through=False, promotion="never") as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        keys, payloads = make_keys(LAYOUT, 2), make_payloads(LAYOUT, 2)
        mem.store(keys[:1], payloads[:1])
        with dram.borrow(keys[0]) as reading:
            assert reading is not None
            with mem.store_in_place(keys[1:]) as op:  # evicts keys[0] (demoted), but its slot is busy
                assert op.num_in_place == 0 and op.views[0] is not None
                _fill(op.views, payloads[1:])
            np.testing.assert_array_equal(reading, payloads[0])
        assert op.stored == 1
        assert mem.lookup(keys).tiers == (1, 1)
        outs = _outs(2)
        assert mem.load(keys, outs) == 2
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))
        assert mem.directory.settled() and not dram._reserved


def test_top_tier_not_dram_uses_the_copy_path(tmp_path: Path) -> None:
    disk = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=10 * LAYOUT.chunk_bytes, fsync=False)
    with ContextMemory(LAYOUT, [disk]) as mem:
        keys, payloads = make_keys(LAYOUT, 2), make_payloads(LAYOUT, 2)
        with mem.store_in_place(keys) as op:
            assert op.num_in_place == 0 and all(v is not None for v in op.views)
            _fill(op.views, payloads)
        assert op.stored == 2
        outs = _outs(2)
        assert mem.load(keys, outs) == 2
        np.testing.assert_array_equal(outs[0], payloads[0])


def test_account_load_counts_hits_and_refreshes_order(tmp_path: Path) -> None:
    with _memory(tmp_path, 2, 100, write_through=False) as mem:
        keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
        mem.store(keys[:2], payloads[:2])
        mem.account_load(keys[:1], [0])  # an engine read keys[0] itself (a zero-copy borrow)
        assert mem.stats()["dram"].hits == 1
        mem.store(keys[2:], payloads[2:])
        assert mem.lookup(keys).tiers == (0, 1, 0)  # keys[0] was touched: keys[1] went down


# --- borrow_prefix: loads without copies ------------------------------------------------------
def _stored_on_disk(tmp: Path, n: int) -> tuple[list, list[np.ndarray]]:
    keys, payloads = make_keys(LAYOUT, n), make_payloads(LAYOUT, n)
    with _memory(tmp, n, 100) as mem:
        mem.store(keys, payloads)
    return keys, payloads  # a restart finds them on disk only


def test_borrow_prefix_borrows_dram_hits_and_promotes_disk_hits_in_place(tmp_path: Path) -> None:
    keys, payloads = _stored_on_disk(tmp_path, 5)
    with _memory(tmp_path, 8, 100) as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        assert mem.load(keys[:2], _outs(2)) == 2  # chunks 0-1 promoted: DRAM, 2-4: disk
        assert mem.lookup(keys).tiers == (0, 0, 1, 1, 1)
        hits_before = [t.stats.hits for t in mem.tiers]
        with mem.borrow_prefix(keys) as views:
            assert len(views) == 5
            for view, payload in zip(views, payloads, strict=True):
                np.testing.assert_array_equal(view, payload)
                assert np.shares_memory(view, np.asarray(dram.pool)) and not view.flags.writeable
        assert mem.lookup(keys).tiers == (0,) * 5  # promoted, in place
        assert [t.stats.hits - b for t, b in zip(mem.tiers, hits_before, strict=True)] == [2, 3]
        assert dram.stats.promotions == 2 + 3
        assert dram.used_bytes == mem.indexes[0].used_bytes == 5 * LAYOUT.chunk_bytes


def test_borrowed_slots_are_not_reused_until_the_block_ends(tmp_path: Path) -> None:
    keys, payloads = _stored_on_disk(tmp_path, 2)
    with _memory(tmp_path, 2, 100) as mem:
        with mem.borrow_prefix(keys) as views:
            flood, flood_payloads = make_keys(LAYOUT, 4, seed=3), make_payloads(LAYOUT, 4, seed=3)
            mem.store(flood, flood_payloads)  # evicts both (demoted), but their slots are borrowed
            for view, payload in zip(views, payloads, strict=True):
                np.testing.assert_array_equal(view, payload)
        outs = _outs(4)
        assert mem.load(flood, outs) == 4
        for out, payload in zip(outs, flood_payloads, strict=True):
            np.testing.assert_array_equal(out, payload)


def test_borrow_prefix_stops_at_a_corrupt_chunk_and_keeps_no_slot_for_it(tmp_path: Path) -> None:
    keys, payloads = _stored_on_disk(tmp_path, 4)
    with _memory(tmp_path, 8, 100) as mem:
        disk = mem.tiers[1]
        assert isinstance(disk, DiskTier)
        flip_byte(disk.path_of(keys[2]), -1)
        with mem.borrow_prefix(keys) as views:
            assert len(views) == 2
            for view, payload in zip(views, payloads[:2], strict=True):
                np.testing.assert_array_equal(view, payload)
        assert disk.stats.corrupt == 1
        assert mem.lookup(keys).tiers == (0, 0)  # chunk 3 (past the corrupt one) was not promoted
        assert mem.tiers[0].used_bytes == mem.indexes[0].used_bytes == 2 * LAYOUT.chunk_bytes
        assert mem.load(keys, _outs(4)) == 2  # the caller's fallback finds the same prefix


def test_borrow_prefix_needs_a_dram_top_tier_and_promotion(tmp_path: Path) -> None:
    keys, _ = _stored_on_disk(tmp_path, 2)
    disk_only = ContextMemory(LAYOUT, [DiskTier(LAYOUT, path=tmp_path, capacity_bytes=1 << 20, fsync=False)])
    with disk_only, disk_only.borrow_prefix(keys) as views:
        assert views == []
    with _memory(tmp_path, 4, 100, promotion="never") as mem, mem.borrow_prefix(keys) as views:
        assert views == []


def test_borrowed_prefix_is_not_evicted_to_promote_its_own_chunks(tmp_path: Path) -> None:
    """DRAM holds the prefix's last chunks: the first ones are read into plain buffers, promoted after."""
    keys, payloads = _stored_on_disk(tmp_path, 5)
    with _memory(tmp_path, 2, 100) as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        assert mem.load(keys[3:], _outs(2)) == 2  # chunks 3-4 promoted: DRAM is full
        with mem.borrow_prefix(keys) as views:
            assert len(views) == 5
            for view, payload in zip(views, payloads, strict=True):
                np.testing.assert_array_equal(view, payload)
            pooled = [np.shares_memory(v, np.asarray(dram.pool)) for v in views]
            assert pooled == [False, False, False, True, True]
            assert mem.lookup(keys).tiers == (1, 1, 1, 0, 0) and dram.stats.evictions == 0
            mem.store(make_keys(LAYOUT, 1, seed=4), make_payloads(LAYOUT, 1, seed=4))  # goes below
            assert mem.lookup(keys[3:]).tiers == (0, 0)
        assert mem.lookup(keys).tiers == (1, 0, 0, 1, 1)  # after the block: promoted in order, as load does
        assert dram.stats.promotions == 2 + 3 and mem.directory.settled()


def test_an_error_in_a_borrow_block_leaves_nothing_held_or_reserved(tmp_path: Path) -> None:
    keys, payloads = _stored_on_disk(tmp_path, 3)
    with _memory(tmp_path, 4, 100) as mem:
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        with pytest.raises(RuntimeError), mem.borrow_prefix(keys) as views:
            assert len(views) == 3
            raise RuntimeError("the engine's copy failed")
        assert mem.directory.settled() and not dram._reserved
        outs = _outs(3)
        assert mem.load(keys, outs) == 3
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))


def test_not_waiting_below_hands_victims_to_the_writer_or_drops_them(tmp_path: Path) -> None:
    """``wait_below=False`` (an engine's save path): a victim whose write-through has not reached
    disk is not written on the caller's time: its bytes go to the writer thread, which puts them
    on disk, within a bounded queue; beyond it, victims are dropped."""
    with _memory(tmp_path, 2, 100, write_through=False) as mem:
        keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
        mem.store(keys[:2], payloads[:2])  # not written through: only in DRAM
        with mem.store_in_place(keys[2:], wait_below=False) as op:
            assert op.num_in_place == 2 and op.num_dropped == 0
            _fill(op.views, payloads[2:])
        mem.flush()  # the writer's queue, hand-offs included
        dram = mem.stats()["dram"]
        assert dram.evictions == 2 and dram.demotions == 2 and "dropped_unwritten" not in dram.extra
        assert mem.lookup(keys).tiers == (1, 1, 0, 0)
        outs = _outs(2)
        assert mem.load(keys[:2], outs) == 2
        for out, payload in zip(outs, payloads[:2], strict=True):
            np.testing.assert_array_equal(out, payload)
    with _memory(tmp_path / "full", 2, 100, write_through=False) as mem:
        mem.mover._handoff_cap = 0  # the writer is behind by more than the queue holds
        keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
        mem.store(keys[:2], payloads[:2])
        with mem.store_in_place(keys[2:], wait_below=False) as op:
            _fill(op.views, payloads[2:])
        mem.flush()
        dram = mem.stats()["dram"]
        assert dram.demotions == 0 and dram.extra["dropped_unwritten"] == 2
        assert mem.lookup(keys).num_chunks == 0 and mem.usage()["disk"][0] == 0


def test_not_waiting_below_drops_chunks_dram_refuses_without_a_buffer(tmp_path: Path) -> None:
    """A chunk the top tier gives no slot (here: DRAM full of pinned chunks) is not spilled to a
    buffer and put below: its view is None, it is not stored, and the next ones are not either."""
    with _memory(tmp_path, 2, 100, write_through=False) as mem:
        keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
        mem.store(keys[:2], payloads[:2])
        mem.pin(keys[:2])
        op = mem.store_in_place(keys[2:], wait_below=False)
        assert op.views == [None, None] and op.num_dropped == 2 and op.num_in_place == 0
        assert op.commit() == 0
        assert mem.lookup(keys[2:]).num_chunks == 0 and mem.usage()["disk"][0] == 0
        spilled = mem.store_in_place(keys[2:])  # the default: spilled to buffers, put on disk at commit
        assert all(v is not None for v in spilled.views) and spilled.num_dropped == 0
        _fill(spilled.views, payloads[2:])
        assert spilled.commit() == 2 and mem.lookup(keys[2:]).tiers == (1, 1)
