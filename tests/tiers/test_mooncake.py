"""MooncakeTier against a real mooncake_master (HTTP metadata server built in) and a storage node."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.harness.servers import MooncakeServers
from kvtier.codec import encode_chunk
from kvtier.config import BreakerConfig
from kvtier.layout import KVLayout
from kvtier.testing import TierConformance
from kvtier.tiers import mooncake as mooncake_tier
from kvtier.tiers.breaker import BreakerMode
from kvtier.tiers.mooncake import MooncakeTier
from tests.conftest import FORGERIES, forgery, make_keys, make_payloads
from tests.tiers.servers import mooncake_config, mooncake_servers  # noqa: F401


def _buf(layout: KVLayout) -> np.ndarray:
    return np.zeros(layout.chunk_bytes, dtype=np.uint8)


def _raw_store(servers: MooncakeServers) -> Any:
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", servers.metadata_server, 0, 16 << 20, "tcp", "", servers.master_address) == 0
    return store


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class TestMooncake(TierConformance):
    @pytest.fixture
    def tier(self, layout: KVLayout, mooncake_servers: MooncakeServers) -> Iterator[MooncakeTier]:  # noqa: F811
        t = MooncakeTier(layout, mooncake_config(mooncake_servers))
        yield t
        t.close()

    def test_value_is_a_self_describing_chunk(self, tier: MooncakeTier, layout: KVLayout,
                                              mooncake_servers: MooncakeServers) -> None:  # noqa: F811
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        assert tier.put(key, payload)
        raw = _raw_store(mooncake_servers)
        name = f"{tier.config.key_prefix}:{layout.fingerprint:016x}:{key.hex()}"
        assert tier.object_key(key) == name
        assert raw.get(name) == encode_chunk(key, layout.fingerprint, payload)
        raw.close()

    @pytest.mark.parametrize("damage", ["bitflip", "truncate", "foreign_layout", "too_long", *FORGERIES])
    def test_bad_value_is_a_miss_removed_and_counted(self, tier: MooncakeTier, layout: KVLayout,
                                                     mooncake_servers: MooncakeServers,  # noqa: F811
                                                     damage: str) -> None:
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        good = encode_chunk(key, layout.fingerprint, payload)
        bad = {"bitflip": good[:-1] + bytes([good[-1] ^ 1]), "truncate": good[:-10],
               "foreign_layout": encode_chunk(key, layout.fingerprint ^ 1, payload),
               "too_long": good + b"trailing bytes"}.get(damage) or forgery(damage, key, layout, payload)
        raw = _raw_store(mooncake_servers)
        assert raw.put(tier.object_key(key), bad) == 0
        out = np.full(layout.chunk_bytes, 7, dtype=np.uint8)
        assert not tier.get_into(key, out)
        assert (out == 7).all()
        assert tier.stats.corrupt == 1
        assert raw.is_exist(tier.object_key(key)) == 0
        raw.close()

    def test_batches_larger_than_the_staging_arena(self, layout: KVLayout,
                                                   mooncake_servers: MooncakeServers) -> None:  # noqa: F811
        tier = MooncakeTier(layout, mooncake_config(mooncake_servers, staging_bytes=3 * layout.chunk_bytes))
        assert tier.num_slots == 2
        keys, payloads = make_keys(layout, 7), make_payloads(layout, 7)
        assert tier.put_many(keys, payloads) == [True] * 7
        outs = [_buf(layout) for _ in keys]
        assert tier.get_many_into(keys, outs) == [True] * 7
        for o, p in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(o, p)
        tier.close()


def test_master_down_is_misses_then_recovers(small_layout: KVLayout) -> None:
    with MooncakeServers(segment_size="64MB") as servers:
        tier = MooncakeTier(small_layout, mooncake_config(servers, timeout_s=1.0))
        keys, payloads = make_keys(small_layout, 4), make_payloads(small_layout, 4)
        assert all(tier.put_many(keys, payloads))
        servers.kill_master()
        outs = [_buf(small_layout) for _ in keys]
        t0 = time.monotonic()
        for _ in range(5):  # never raises; each call waits at most timeout_s, then the breaker opens
            assert tier.get_many_into(keys, outs) == [False] * 4
            assert tier.contains_many(keys) == [False] * 4
            assert tier.put_many(keys, payloads) == [False] * 4
        assert time.monotonic() - t0 < 2 * 1.0 + 2.0
        assert tier.breaker.mode is not BreakerMode.CLOSED
        assert tier.stats.errors >= 2 and tier.stats.extra["short_circuited"] > 0
        servers.start_master()  # a fresh master: objects are gone, the storage node re-mounts
        assert _wait_for(lambda: tier.put_many(keys, payloads) == [True] * 4)
        assert tier.get_many_into(keys, outs) == [True] * 4
        for o, p in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(o, p)
        assert tier.breaker.mode is BreakerMode.CLOSED
        tier.close()


def test_tier_built_while_master_is_down_connects_later(small_layout: KVLayout) -> None:
    with MooncakeServers(segment_size="64MB") as servers:
        servers.kill_master()
        t0 = time.monotonic()
        tier = MooncakeTier(small_layout, mooncake_config(servers, timeout_s=1.0))
        (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
        assert not tier.put(key, payload) and not tier.contains(key)
        assert time.monotonic() - t0 < 3.0
        servers.start_master()
        assert _wait_for(lambda: tier.put(key, payload))
        assert tier.get_into(key, _buf(small_layout))
        tier.close()


def test_hung_master_costs_bounded_waits_then_answers_at_once(small_layout: KVLayout) -> None:
    with MooncakeServers(segment_size="64MB") as servers:
        tier = MooncakeTier(small_layout, mooncake_config(servers, timeout_s=0.5))
        keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
        assert all(tier.put_many(keys, payloads))
        # asked while the master hangs: keys the client has never seen, so no answer can come
        # from anything the client kept of its own puts (the stored keys were once answered
        # during the pause, in a clean-clone CI run)
        unseen = make_keys(small_layout, 3, seed=99)
        servers.pause_master()
        try:
            outs = [_buf(small_layout) for _ in keys]
            waits = []
            for _ in range(6):
                t0 = time.monotonic()
                assert tier.get_many_into(unseen, outs) == [False] * 3
                waits.append(time.monotonic() - t0)
            assert max(waits) < 0.5 + 0.3  # never longer than timeout_s (+ scheduling slack)
            assert all(w < 0.05 for w in waits[2:])  # open breaker after 2 overruns: at once
            assert tier.stats.errors >= 2 * 3
        finally:
            servers.resume_master()
        assert _wait_for(lambda: tier.get_many_into(keys, outs) == [True] * 3)  # same master: data kept
        for o, p in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(o, p)
        tier.close()


def test_a_batch_of_many_rounds_ends_within_its_deadline(small_layout: KVLayout, monkeypatch: pytest.MonkeyPatch,
                                                         mooncake_servers: MooncakeServers) -> None:  # noqa: F811
    """A slow store: each round of a batch larger than the staging arena takes 0.4 s, under
    timeout_s, so no single wait overruns; 24 rounds would take ~5 s.  The whole call ends
    within deadline_s instead: the rounds past it are not started, their keys counted misses.
    (The slowness is injected around the real client call: a hung master is covered above.)"""
    lenient = BreakerConfig(failure_threshold=100, base_backoff_s=0.2, max_backoff_s=1.0)  # never opens here
    tier = MooncakeTier(small_layout, mooncake_config(mooncake_servers, timeout_s=2.0, deadline_s=1.0, breaker=lenient,
                                                      staging_bytes=3 * small_layout.chunk_bytes))
    assert tier.num_slots == 2  # one key per round, two rounds in flight
    keys, payloads = make_keys(small_layout, 24, seed=97), make_payloads(small_layout, 24, seed=97)
    assert tier.put_many(keys, payloads) == [True] * 24
    real = mooncake_tier._batch_get_into

    def slow(*args: Any) -> Any:
        time.sleep(0.4)
        return real(*args)

    monkeypatch.setattr(mooncake_tier, "_batch_get_into", slow)
    outs = [_buf(small_layout) for _ in keys]
    t0 = time.monotonic()
    got = tier.get_many_into(keys, outs)
    assert time.monotonic() - t0 < 1.0 + 1.5  # deadline + slack
    assert got[0] and not all(got)  # the first rounds served, the rest given up
    assert tier.stats.errors == got.count(False)
    tier.close()


def test_puts_from_a_pool_go_zero_copy(small_layout: KVLayout,
                                       mooncake_servers: MooncakeServers) -> None:  # noqa: F811
    """Payloads that are views of one large allocation (a DRAM pool) are sent without a copy once
    the pool is registered; the stored values are the same self-describing chunks."""
    layout = small_layout
    cb = layout.chunk_bytes
    tier = MooncakeTier(layout, mooncake_config(mooncake_servers))
    pool = np.concatenate(make_payloads(layout, 8, seed=3))
    views = [pool[i * cb:(i + 1) * cb] for i in range(8)]
    keys = make_keys(layout, 8, seed=3)
    registered = tier._registered

    def at_worst_timing(root: np.ndarray) -> bool:  # the registration ends before the next payload is seen
        answer = registered(root)
        assert _wait_for(lambda: len(tier._caller_memory.regs) == 1)
        return answer

    tier._registered = at_worst_timing  # type: ignore[method-assign]
    assert tier.put_many(keys[:2], views[:2]) == [True] * 2  # copied, both; registers the pool meanwhile
    tier._registered = registered  # type: ignore[method-assign]
    assert tier.stats.extra["zero_copy_puts"] == 0
    assert tier.put_many(keys[2:], [v.view() for v in views[2:]]) == [True] * 6  # views of views: same pool
    assert tier.stats.extra["zero_copy_puts"] == 6
    raw = _raw_store(mooncake_servers)
    for key, view in zip(keys, views, strict=True):
        assert raw.get(tier.object_key(key)) == encode_chunk(key, layout.fingerprint, view)
    raw.close()
    outs = [_buf(layout) for _ in keys]
    assert tier.get_many_into(keys, outs) == [True] * 8
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, views[i])
    del pool, views, view
    gc.collect()
    assert tier._caller_memory.regs == {}  # freeing the pool unregistered it
    tier.close()


def test_memory_that_cannot_be_registered_is_copied(small_layout: KVLayout,
                                                   mooncake_servers: MooncakeServers) -> None:  # noqa: F811
    """A second array over memory already registered (overlap) falls back to the staging copy."""
    layout = small_layout
    cb = layout.chunk_bytes
    tier = MooncakeTier(layout, mooncake_config(mooncake_servers))
    pool = np.concatenate(make_payloads(layout, 4, seed=5))
    keys = make_keys(layout, 8, seed=5)
    assert tier.put_many(keys[:4], [pool[i * cb:(i + 1) * cb] for i in range(4)]) == [True] * 4
    assert _wait_for(lambda: len(tier._caller_memory.regs) == 1)
    alias = np.frombuffer(memoryview(pool), dtype=np.uint8)  # another root array, same memory
    assert alias.base is not pool and not isinstance(alias.base, np.ndarray)
    views = [alias[i * cb:(i + 1) * cb] for i in range(4)]
    assert tier.put_many(keys[4:5], views[:1]) == [True]
    assert _wait_for(lambda: id(alias) in tier._caller_memory.unregistrable)
    assert tier.put_many(keys[5:], views[1:]) == [True] * 3
    assert tier.stats.extra["zero_copy_puts"] == 0
    outs = [_buf(layout) for _ in keys]
    assert tier.get_many_into(keys, outs) == [True] * 8
    for o, v in zip(outs, [*(pool[i * cb:(i + 1) * cb] for i in range(4)), *views], strict=True):
        np.testing.assert_array_equal(o, v)
    tier.close()
    assert tier._caller_memory.regs == {}
