"""Prefetch during pauses (kvtier/prefetch.py), on a real DRAM pool and real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.policy.retention import Retention
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads

LAYOUT = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
DEADLINE_S = 60.0  # a generous bound for a background prefetch on a loaded box


def _memory(tmp: Path, dram_chunks: int, **kw: object) -> ContextMemory:
    tiers = [DramTier(LAYOUT, capacity_bytes=dram_chunks * LAYOUT.chunk_bytes),
             DiskTier(LAYOUT, path=tmp, capacity_bytes=100 * LAYOUT.chunk_bytes, fsync=False)]
    return ContextMemory(LAYOUT, tiers, **kw)  # type: ignore[arg-type]


def _outs(n: int) -> list[np.ndarray]:
    return [np.zeros(LAYOUT.chunk_bytes, np.uint8) for _ in range(n)]


def test_a_tool_pause_brings_the_session_back_to_dram_and_the_next_load_hits_it(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    a, b = keys[:2], keys[2:]
    with _memory(tmp_path, 2, prefetch_share=1.0) as mem:
        mem.hint(a, session="agent")
        mem.store(a, payloads[:2])
        mem.flush()
        mem.store(b, payloads[2:])  # LRU: the session's chunks go down to disk
        mem.flush()
        assert mem.lookup(a).tiers == (1, 1)
        mem.delete(b)  # room in DRAM (a policy that predicts nothing: free room only)
        mem.hint_end("agent", awaits="tool")
        assert mem.prefetch.drain(DEADLINE_S)
        assert mem.lookup(a).tiers == (0, 0)
        assert mem.prefetch.stats.prefetched == 2
        outs = _outs(2)
        disk_hits = mem.tiers[1].stats.hits
        assert mem.load(a, outs) == 2
        assert all((o == p).all() for o, p in zip(outs, payloads[:2], strict=True))
        assert mem.tiers[1].stats.hits == disk_hits  # served from DRAM
        assert mem.prefetch.stats.used == 2 and mem.prefetch.stats.wasted == 0


def test_a_user_pause_or_no_share_prefetches_nothing(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 2), make_payloads(LAYOUT, 2)
    for share, awaits in ((1.0, "user"), (0.0, "tool")):
        with _memory(tmp_path / f"{share}{awaits}", 1, prefetch_share=share) as mem:
            mem.hint(keys, session="s")
            mem.store(keys, payloads)
            mem.flush()
            mem.delete(keys[1:])
            mem.hint_end("s", awaits=awaits)
            assert mem.prefetch.drain(DEADLINE_S)
            assert mem.prefetch.stats.prefetched == 0


@pytest.mark.parametrize("pinned", [False, True])
def test_a_prefetch_takes_a_colder_chunks_room_never_a_hotter_ones(tmp_path: Path, pinned: bool) -> None:
    """The low-priority chunk's slot goes to the session; pinned, it stays, and the high-priority
    chunk behind it (which a victim search past the pinned top would reach) stays too."""
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    a, hot, cold = keys[:2], keys[2], keys[3]
    with _memory(tmp_path, 2, eviction="agent", prefetch_share=1.0) as mem:
        mem.hint(a, session="a", now=0.0)
        mem.store(a, payloads[:2])
        mem.flush()  # written through: a victim's slot is free at once
        mem.hint([hot], session="b", now=1.0, retention=Retention(priority=1))
        mem.store([hot], payloads[2:3])  # outranks the session's chunks: one goes down
        mem.flush()
        mem.hint([cold], session="c", now=2.0, retention=Retention(priority=1))
        mem.store([cold], payloads[3:])  # ... and the other
        mem.flush()
        mem.hint([cold], session="c", now=3.0, retention=Retention(priority=-1))  # now the coldest
        if pinned:
            mem.pin([cold])
        assert mem.lookup(a).tiers == (1, 1) and mem.lookup([hot]).tiers == mem.lookup([cold]).tiers == (0,)
        mem.hint_end("a", awaits="tool")
        assert mem.prefetch.drain(DEADLINE_S)
        assert mem.lookup([hot]).tiers == (0,)  # never the high-priority chunk's slot
        if pinned:
            assert mem.lookup(a).tiers == (1, 1) and mem.lookup([cold]).tiers == (0,)
            assert mem.prefetch.stats.prefetched == 0
        else:
            assert mem.lookup(a).tiers == (0, 1) and mem.lookup([cold]).tiers == (1,)
            assert mem.prefetch.stats.prefetched == 1


def _demote_then_pause(mem: ContextMemory, a: list[ChunkKey], b: list[ChunkKey], payloads: list[Any]) -> None:
    """Session "agent" stores ``a``, ``b`` pushes it to disk and is deleted; the answer then waits
    for a tool: ``a`` is prefetched back into the free DRAM slots."""
    mem.hint(a, session="agent")
    mem.store(a, payloads[:2])
    mem.flush()
    mem.store(b, payloads[2:])
    mem.flush()
    mem.delete(b)
    mem.hint_end("agent", awaits="tool")
    assert mem.prefetch.drain(DEADLINE_S)


def test_a_prefetched_chunk_evicted_unread_is_counted_wasted(tmp_path: Path) -> None:
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    a, b = keys[:2], keys[2:]
    with _memory(tmp_path, 2, prefetch_share=1.0) as mem:
        _demote_then_pause(mem, a, b, payloads)
        assert mem.prefetch.stats.prefetched == 2
        mem.store(b, payloads[2:])  # the foreground needs the room before the session came back
        assert mem.prefetch.stats.wasted == 2 and mem.prefetch.stats.used == 0
        assert mem.lookup(a).tiers == (1, 1)  # demoted again, not lost


def test_pressure_on_a_prefetched_chunk_cancels_the_prefetches_queued(tmp_path: Path) -> None:
    import threading

    keys, payloads = make_keys(LAYOUT, 6), make_payloads(LAYOUT, 6)
    a, b, x, y, z, w = ([k] for k in keys)
    with _memory(tmp_path, 2, prefetch_share=1.0) as mem:
        mem.hint(a, session="a")
        mem.hint(b, session="b")
        for chunk, payload in ((a, payloads[0]), (b, payloads[1]), (x, payloads[2]), (y, payloads[3])):
            mem.store(chunk, [payload])
            mem.flush()
        mem.delete(x)  # DRAM: y and a free slot; a and b on disk
        mem.hint_end("b", awaits="tool")
        assert mem.prefetch.drain(DEADLINE_S) and mem.prefetch.stats.prefetched == 1
        gate = threading.Event()
        blocker = mem.prefetch._pool.submit(gate.wait, DEADLINE_S)  # type: ignore[union-attr]
        try:
            mem.hint_end("a", awaits="tool")  # queued behind the blocker
            mem.store(z, [payloads[4]])
            mem.flush()
            mem.store(w, [payloads[5]])  # the foreground evicts b, prefetched and unread: pressure
        finally:
            gate.set()
        blocker.result()
        assert mem.prefetch.drain(DEADLINE_S)
        assert mem.prefetch.stats.wasted == 1 and mem.prefetch.stats.cancelled == 1
        assert mem.prefetch.stats.prefetched == 1 and mem.lookup(a).tiers == (1,)


def test_pauses_whose_prefetches_go_unread_are_skipped_until_the_evidence_fades(tmp_path: Path) -> None:
    """The session's prefetched chunks are evicted unread by the foreground; the next pauses are
    skipped, and once that evidence has faded one probes again."""
    keys, payloads = make_keys(LAYOUT, 4), make_payloads(LAYOUT, 4)
    a, b = keys[:2], keys[2:]
    with _memory(tmp_path, 2, prefetch_share=1.0) as mem:
        _demote_then_pause(mem, a, b, payloads)
        stats = mem.prefetch.stats
        assert stats.prefetched == 2 and stats.skipped == 0
        mem.store(b, payloads[2:])  # the foreground takes the room before the session came back
        mem.flush()
        mem.delete(b)
        assert stats.wasted == 2 and stats.used == 0
        pauses = 0
        while stats.prefetched == 2 and pauses < 200:
            mem.hint_end("agent", awaits="tool")
            assert mem.prefetch.drain(DEADLINE_S)
            pauses += 1
        assert stats.skipped == pauses - 1 >= 1  # skipped, until one probed again
        assert stats.prefetched == 4 and mem.lookup(a).tiers == (0, 0)
