from __future__ import annotations

import pytest

from kvtier.keys import ChunkKey
from kvtier.policy.eviction import LRUPolicy, S3FIFOPolicy
from kvtier.policy.index import PinSet, TierIndex
from kvtier.policy.registry import make_policy


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def test_lru_order_and_access() -> None:
    p = LRUPolicy()
    for i in range(4):
        p.insert(k(i), 1)
    p.access(k(0))
    assert [p.pop_victim(lambda _: True) for _ in range(4)] == [k(1), k(2), k(3), k(0)]
    assert p.pop_victim(lambda _: True) is None


def test_reads_above_refresh_recency_not_frequency() -> None:
    lru, s3 = LRUPolicy(), S3FIFOPolicy()
    for policy in (lru, s3):
        for i in range(3):
            policy.insert(k(i), 1)
        policy.access_above(k(0))
    assert lru.pop_victim(lambda _: True) == k(1)  # k(0)'s copy was refreshed
    assert s3.pop_victim(lambda _: True) == k(0)  # still a one-off in this tier: first out


def test_victims_skip_unevictable() -> None:
    for policy in (LRUPolicy(), S3FIFOPolicy()):
        for i in range(5):
            policy.insert(k(i), 1)
        victim = policy.pop_victim(lambda key: key != k(0))
        assert victim is not None and victim != k(0)
        assert policy.pop_victim(lambda key: False) is None
        assert len(policy) == 4


def test_s3fifo_resists_a_scan() -> None:
    """A hot set that is re-read survives a one-off scan that would flush LRU."""
    capacity = 10
    hot = [k(i) for i in range(5)]
    scan = [k(100 + i) for i in range(50)]
    results = {}
    for name in ("lru", "s3fifo"):
        index = TierIndex("t", capacity, make_policy(name))
        for key in hot:
            index.add(key, 1)
        for key in hot:
            index.touch(key)  # hot: read again
        for key in scan:
            victims = index.plan_room(1, lambda _: True)
            assert victims is not None
            index.add(key, 1)
        results[name] = sum(key in index for key in hot)
    assert results["lru"] == 0
    assert results["s3fifo"] == 5


def test_plan_room_rolls_back_when_impossible() -> None:
    index = TierIndex("t", 3, LRUPolicy())
    for i in range(3):
        index.add(k(i), 1)
    pins = PinSet()
    pins.pin([k(0), k(1), k(2)])
    assert index.plan_room(1, lambda key: key not in pins) is None
    assert len(index) == 3 and index.used_bytes == 3
    pins.unpin([k(1)])
    assert index.plan_room(1, lambda key: key not in pins) == [k(1)]
    assert index.plan_room(5, lambda _: True) is None  # larger than the tier


def test_pins_count_and_expire() -> None:
    now = [0.0]
    pins = PinSet(clock=lambda: now[0])
    pins.pin([k(1)])
    pins.pin([k(1)])
    pins.unpin([k(1)])
    assert k(1) in pins
    pins.unpin([k(1)])
    assert k(1) not in pins
    pins.pin([k(2)], ttl_s=5)
    now[0] = 4.9
    assert k(2) in pins
    now[0] = 5.0
    assert k(2) not in pins


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("random")
