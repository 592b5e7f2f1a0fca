"""Exclusive tiers: DRAM and disk hold different chunks, so their capacities add up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvtier.config import DiskConfig, DramConfig, KVTierConfig
from kvtier.errors import ConfigError, TierError
from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads
from tests.test_hierarchy import LAYOUT, _memory, _outs


def _on_disk(mem: ContextMemory) -> set:
    return set(mem.indexes[1].sizes)


def test_exclusive_capacities_add_up(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 6), make_payloads(LAYOUT, 6)
    with _memory(tmp_path / "inc", 3, 3) as inclusive, _memory(tmp_path / "exc", 3, 3, exclusive=True) as exclusive:
        for mem in (inclusive, exclusive):
            mem.store(keys, payloads)
            mem.flush()
        # inclusive: the disk holds copies of what DRAM holds, 3 + 3 slots keep only 3 distinct chunks
        assert inclusive.lookup(keys).num_chunks == 0 and len(_on_disk(inclusive)) == 3
        assert _on_disk(inclusive) == set(inclusive.indexes[0].sizes)
        # exclusive: nothing written through; DRAM's victims went down: all 6 are held, once each
        assert exclusive.lookup(keys).tiers == (1, 1, 1, 0, 0, 0)
        assert not _on_disk(exclusive) & set(exclusive.indexes[0].sizes)
        outs = _outs(6)
        assert exclusive.load(keys, outs) == 6
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))


def test_exclusive_promotion_leaves_the_disk(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    with _memory(tmp_path, 2, 4, exclusive=True) as mem:
        mem.store(keys, payloads)  # keys 0, 1 demoted to disk
        assert mem.lookup(keys).tiers == (1, 1, 0, 0)
        assert mem.load(keys[:2], _outs(2)) == 2  # promoted back: 2, 3 demoted in turn
        mem.flush()
        assert mem.lookup(keys).tiers == (0, 0, 1, 1)
        assert _on_disk(mem) == set(keys[2:])  # no stale copy of 0, 1 takes disk room
        assert mem.stats()["disk"].bytes_read == 2 * LAYOUT.chunk_bytes


def test_exclusive_writes_through_pinned_chunks_and_the_leading_share(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 8), make_payloads(LAYOUT, 8)
    with _memory(tmp_path, 8, 8, exclusive=True, write_through_share=0.25) as mem:
        mem.pin([keys[6]])
        mem.store(keys, payloads)
        mem.flush()
        # the first quarter of the batch (chunks 0, 1: a restart finds the prefix) and the pinned one
        assert _on_disk(mem) == {keys[0], keys[1], keys[6]}
        mem.load(keys, _outs(8))
        assert keys[6] in _on_disk(mem)  # a pinned chunk's copy stays when it is read


def test_exclusive_from_config_and_bad_share(tmp_path: Path) -> None:
    config = KVTierConfig(chunk_tokens=LAYOUT.tokens_per_chunk, tiers=("dram", "disk"), exclusive=True,
                          write_through_share=0.5, eviction="agent",
                          dram=DramConfig(capacity=4 * LAYOUT.chunk_bytes),
                          disk=DiskConfig(path=str(tmp_path), capacity=4 * LAYOUT.chunk_bytes))
    with ContextMemory.open(LAYOUT, config) as mem:
        assert mem.exclusive and mem.write_through_share == 0.5
        assert mem.indexes[0].policy.name == "agent"
        assert mem.indexes[0].policy.model is mem.indexes[1].policy.model  # one model for all tiers
    tiers = [DramTier(LAYOUT, capacity_bytes=LAYOUT.chunk_bytes)]
    with pytest.raises(ConfigError, match="write_through_share"):
        ContextMemory(LAYOUT, tiers, exclusive=True, write_through_share=1.5)  # type: ignore[arg-type]
    assert isinstance(DiskTier, type) and np.uint8


def test_agent_policy_keeps_the_head_of_a_context_larger_than_the_tiers(tmp_path: Path) -> None:
    # a 12-chunk context through DRAM 2 + disk 3, exclusive: LRU keeps the tail (no prefix hit),
    # the agent policy keeps the first 5 chunks and serves them on every later turn
    keys, payloads = make_keys(LAYOUT, 12), make_payloads(LAYOUT, 12)
    served = {}
    for policy in ("lru", "agent"):
        with _memory(tmp_path / policy, 2, 3, exclusive=True, eviction=policy) as mem:
            served[policy] = []
            for turn in range(3):
                mem.hint(keys, session="s", now=10.0 * turn)
                outs = _outs(12)
                n = mem.load(keys, outs)
                assert all((o == p).all() for o, p in zip(outs[:n], payloads[:n], strict=True))
                served[policy].append(n)
                mem.store(keys[n:], payloads[n:])
                mem.flush()
    assert served == {"lru": [0, 0, 0], "agent": [0, 5, 5]}


def test_exclusive_close_keeps_what_only_dram_held(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 6), make_payloads(LAYOUT, 6)
    with _memory(tmp_path, 4, 8, exclusive=True) as mem:
        mem.store(keys, payloads)  # 0, 1 demoted; 2..5 only in DRAM
        assert _on_disk(mem) == set(keys[:2])
    with _memory(tmp_path, 4, 8, exclusive=True) as again:  # the restart finds every chunk on disk
        assert again.lookup(keys).tiers == (1,) * 6
        outs = _outs(6)
        assert again.load(keys, outs) == 6
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))


def test_keeping_at_close_is_bounded_by_the_disk_and_optional(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 6), make_payloads(LAYOUT, 6)
    mem = _memory(tmp_path / "small", 4, 3, exclusive=True, eviction="lru-prefix")
    mem.store(keys, payloads)
    mem.close()  # 4 chunks for 1 free disk slot: the disk's policy makes room, as for a demotion
    with _memory(tmp_path / "small", 4, 3, exclusive=True) as again:
        assert len(_on_disk(again)) == 3
        n = again.lookup(keys).num_chunks
        assert again.load(keys, _outs(6)) == n  # what it serves is whole
    mem = _memory(tmp_path / "skip", 4, 8, exclusive=True)
    mem.store(keys, payloads)
    mem.close(keep=False)
    with _memory(tmp_path / "skip", 4, 8, exclusive=True) as again:
        assert _on_disk(again) == set(keys[:2])


class _FailingDisk(DiskTier):
    """A disk whose put raises (not an OSError: a bug, a foreign library) for chosen calls."""

    def __init__(self, *args: object, fail: Callable[[int, ChunkKey], bool], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.calls, self._fail = 0, fail

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        self.calls += 1
        if self._fail(self.calls, key):
            raise RuntimeError(f"put #{self.calls} failed")
        return super().put(key, payload)


def _failing_memory(tmp: Path, fail: Callable[[int, ChunkKey], bool], **kw: object) -> ContextMemory:
    tiers = [DramTier(LAYOUT, capacity_bytes=16 * LAYOUT.chunk_bytes),
             _FailingDisk(LAYOUT, path=tmp, capacity_bytes=32 * LAYOUT.chunk_bytes, fsync=False, fail=fail)]
    return ContextMemory(LAYOUT, tiers, exclusive=True, **kw)  # type: ignore[arg-type]


def test_a_failed_write_through_does_not_stop_close_from_keeping_dram(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 16), make_payloads(LAYOUT, 16)
    mem = _failing_memory(tmp_path, lambda call, _key: call == 1, write_through_share=0.25)
    mem.store(keys, payloads)  # the write-through of the leading 4 fails at its first put
    with pytest.raises(TierError, match="RuntimeError"):
        mem.close()  # the failure is still reported, after DRAM went down
    with _memory(tmp_path, 16, 32, exclusive=True) as again:
        assert _on_disk(again) == set(keys)


def test_one_chunk_failing_at_close_does_not_keep_the_others_from_going_down(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 16), make_payloads(LAYOUT, 16)
    mem = _failing_memory(tmp_path, lambda _call, key: key == keys[5])
    mem.store(keys, payloads)
    with pytest.raises(TierError, match="1 chunk"):
        mem.close()
    with _memory(tmp_path, 16, 32, exclusive=True) as again:
        assert _on_disk(again) == set(keys) - {keys[5]}
