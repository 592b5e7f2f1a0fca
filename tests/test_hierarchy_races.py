"""Races of the hierarchy: an eviction vs a re-store of its victim, capacity shared with another
process, and many threads storing, loading, deleting and pinning overlapping keys at once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.disk import SUFFIX, DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads

LAYOUT = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
CB = LAYOUT.chunk_bytes


class _GatedDisk(DiskTier):
    """A disk tier whose put of one chosen key waits until the test lets it go."""

    gate_key: ChunkKey | None = None
    entered = threading.Event()
    release = threading.Event()

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        if key == self.gate_key:
            self.entered.set()
            assert self.release.wait(timeout=60)
        return super().put(key, payload)


def _agree(mem: ContextMemory) -> None:
    """Index and tier contents agree, and no tier holds more than its capacity."""
    dram, disk = mem.tiers[0], mem.tiers[1]
    assert isinstance(dram, DramTier) and isinstance(disk, DiskTier)
    assert set(dram.keys()) == set(mem.indexes[0].sizes)
    files = {ChunkKey(bytes.fromhex(p.name[:-len(SUFFIX)])) for p in disk.root.rglob("*" + SUFFIX)}
    assert files == set(mem.indexes[1].sizes), (len(files - set(mem.indexes[1].sizes)),
                                                len(set(mem.indexes[1].sizes) - files))
    for index in mem.indexes:
        assert index.used_bytes == sum(index.sizes.values()) <= index.capacity_bytes


def test_a_victim_stored_again_while_it_is_demoted_is_not_deleted(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
    victim, other, new = keys
    disk = _GatedDisk(LAYOUT, path=tmp_path, capacity_bytes=16 * CB, fsync=False)
    disk.entered, disk.release = threading.Event(), threading.Event()
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=2 * CB), disk], write_through=False)
    assert mem.store([victim, other], payloads[:2]) == 2
    disk.gate_key = victim
    evicting = threading.Thread(target=mem.store, args=([new], payloads[2:]))
    evicting.start()  # DRAM is full: ``victim`` (LRU) is demoted, its disk put waits at the gate
    assert disk.entered.wait(timeout=60)
    assert mem.store([victim], payloads[:1]) == 1  # the victim comes back while its old copy is leaving
    disk.release.set()
    evicting.join()
    out = np.zeros(CB, np.uint8)
    assert mem.load([victim], [out]) == 1 and (out == payloads[0]).all()
    _agree(mem)
    mem.close()


def test_reading_another_process_chunk_does_not_take_room_from_demotions(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    disk = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=2 * CB, fsync=False)
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=4 * CB), disk])
    mem.store(keys[:2], payloads[:2])
    mem.flush()  # the disk index is full: 2 of 2
    other = DiskTier(LAYOUT, path=tmp_path, capacity_bytes=16 * CB, fsync=False)  # another process
    assert other.put(keys[2], payloads[2])
    out = np.zeros(CB, np.uint8)
    assert mem.load(keys[2:3], [out]) == 1 and (out == payloads[2]).all()  # found on disk, not adopted: full
    mem.store(keys[3:], payloads[3:])
    mem.flush()  # the write-through evicts the oldest disk chunk to make room
    assert keys[3] in mem.indexes[1] and disk.path_of(keys[3]).exists()
    assert disk.used_bytes <= disk.capacity_bytes
    other.close()
    mem.close()


def test_threads_storing_loading_deleting_and_pinning_keep_every_invariant(tmp_path: Path) -> None:
    """6 threads, 40 overlapping keys, room for 6 in DRAM and 12 on disk.  Afterwards the index and
    the tiers agree and no tier is over capacity; during it every load returned the stored bytes
    and no pinned chunk was ever evicted."""
    keys, payloads = make_keys(LAYOUT, 40, seed=5), make_payloads(LAYOUT, 40, seed=5)
    want = {k: p for k, p in zip(keys, payloads, strict=True)}
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=6 * CB),
                                 DiskTier(LAYOUT, path=tmp_path, capacity_bytes=12 * CB, fsync=False)])
    pinned = keys[:3]  # pinned before they are stored, never unpinned, never deleted
    mem.pin(pinned)
    failures: list[BaseException] = []
    wrong: list[int] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                start = int(rng.integers(0, 36))
                run = keys[start:start + int(rng.integers(1, 5))]
                op = rng.integers(0, 10)
                if op < 4:
                    mem.store(run, [want[k] for k in run])
                elif op < 8:
                    outs = [np.zeros(CB, np.uint8) for _ in run]
                    n = mem.load(run, outs)
                    wrong.extend(i for i in range(n) if not (outs[i] == want[run[i]]).all())
                elif op < 9:
                    mem.delete([k for k in run if k not in pinned])
                else:
                    mem.pin(run[:1])
                    mem.unpin(run[:1])
        except BaseException as exc:
            failures.append(exc)

    mem.store(pinned, [want[k] for k in pinned])
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mem.flush()
    assert not failures, failures
    assert not wrong
    assert mem.directory.settled()
    _agree(mem)
    for key in pinned:  # never evicted from any tier they reached
        assert mem.lookup([key]).num_chunks == 1
        out = np.zeros(CB, np.uint8)
        assert mem.load([key], [out]) == 1 and (out == want[key]).all()
    for key in keys:  # whatever is indexed is loadable and right
        out = np.zeros(CB, np.uint8)
        if mem.lookup([key]).num_chunks:
            assert mem.load([key], [out]) == 1 and (out == want[key]).all()
    mem.close()


class _GatedReadDisk(DiskTier):
    """A disk tier whose read of one chosen key, once done, waits until the test lets it go."""

    gate_key: ChunkKey | None = None
    entered = threading.Event()
    release = threading.Event()

    def get_many_into(self, keys, outs):  # type: ignore[no-untyped-def]
        got = super().get_many_into(keys, outs)
        if self.gate_key in keys:
            self.entered.set()
            assert self.release.wait(timeout=60)
        return got


def test_a_chunk_deleted_while_it_is_read_is_not_adopted_again(tmp_path: Path) -> None:
    """A load reads a chunk from disk; before the load accounts for it, another thread deletes it.
    The accounting must not take it back into the disk's index (its file is gone)."""
    keys, payloads = make_keys(LAYOUT, 3), make_payloads(LAYOUT, 3)
    disk = _GatedReadDisk(LAYOUT, path=tmp_path, capacity_bytes=8 * CB, fsync=False)
    disk.entered, disk.release = threading.Event(), threading.Event()
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=2 * CB), disk])
    mem.store(keys[:1], payloads[:1])
    mem.flush()
    mem.store(keys[1:], payloads[1:])  # keys[0] leaves DRAM; its disk copy stays
    mem.flush()
    assert mem.lookup(keys[:1]).tiers == (1,)
    disk.gate_key = keys[0]
    out = np.zeros(CB, np.uint8)
    loading = threading.Thread(target=mem.load, args=(keys[:1], [out]))
    loading.start()
    assert disk.entered.wait(timeout=60)  # read, not yet accounted
    mem.delete(keys[:1])
    disk.release.set()
    loading.join()
    _agree(mem)
    mem.close()
