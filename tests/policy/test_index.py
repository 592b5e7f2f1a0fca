from __future__ import annotations

from kvtier.keys import ChunkKey
from kvtier.policy.index import PinSet

A, B = ChunkKey(bytes(16)), ChunkKey(bytes([1]) * 16)


def test_an_unpinned_ttl_pin_does_not_expire_a_later_permanent_pin() -> None:
    now = [0.0]
    pins = PinSet(clock=lambda: now[0])
    pins.pin([A], ttl_s=10)
    pins.unpin([A])
    pins.pin([A])  # permanent now
    now[0] = 11.0
    assert A in pins and len(pins) == 1


def test_ttl_pins_nest_with_permanent_ones() -> None:
    now = [0.0]
    pins = PinSet(clock=lambda: now[0])
    pins.pin([A, B], ttl_s=10)
    pins.pin([A])
    now[0] = 10.0
    assert A in pins and B not in pins  # B's only pin lapsed; A keeps its permanent one
    pins.unpin([A])
    assert A not in pins


def test_a_repinned_ttl_key_expires_at_its_new_deadline() -> None:
    now = [0.0]
    pins = PinSet(clock=lambda: now[0])
    pins.pin([A], ttl_s=5)
    pins.unpin([A])
    pins.pin([A], ttl_s=20)
    now[0] = 6.0
    assert A in pins
    now[0] = 20.0
    assert A not in pins
