"""MooncakeTier.close() with calls in flight: no buffer is unregistered while a call may still
move bytes through it.  A stand-in client (this is a test of the tier's own bookkeeping; the
real-server behaviour is in test_mooncake.py) records the order of what happens."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kvtier.config import MooncakeConfig
from kvtier.layout import KVLayout
from kvtier.tiers.mooncake import MooncakeTier
from tests.conftest import make_keys


class _Client:
    """Answers ``batch_is_exist`` only once the test lets it; logs every call."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.unregistered = threading.Event()

    def batch_is_exist(self, names: list[str]) -> list[int]:
        self.entered.set()
        self.release.wait(timeout=60)
        # the transfer is still "moving bytes": an unregister now would be the bug (waited for
        # briefly so a wrong close shows here; a right one never unregisters meanwhile)
        self.unregistered.wait(timeout=0.5)
        self.log.append("call ended")
        return [0] * len(names)

    def unregister_buffer(self, ptr: int) -> int:
        self.log.append("unregister")
        self.unregistered.set()
        return 0

    def close(self) -> None:
        self.log.append("close")


class _Tier(MooncakeTier):
    client: _Client

    def _make_store(self) -> Any:
        return self.client


def _tier(layout: KVLayout, timeout_s: float) -> tuple[_Tier, _Client]:
    client = _Client()
    _Tier.client = client
    tier = _Tier(layout, MooncakeConfig(timeout_s=timeout_s, staging_bytes=4 * layout.chunk_bytes))
    assert tier._store is client
    return tier, client


def _probe_in_flight(tier: _Tier, client: _Client) -> threading.Thread:
    keys = make_keys(tier.layout, 2)
    probe = threading.Thread(target=tier.contains_many, args=(keys,))
    probe.start()
    assert client.entered.wait(timeout=60)
    return probe


def test_close_waits_for_a_call_in_flight_before_unregistering(small_layout: KVLayout) -> None:
    tier, client = _tier(small_layout, timeout_s=30)
    probe = _probe_in_flight(tier, client)
    client.release.set()  # the call ends only after the 0.5 s an early unregister would need
    tier.close()
    probe.join()
    assert client.log == ["call ended", "unregister", "close"]


def test_a_call_overrunning_close_releases_the_memory_when_it_ends(small_layout: KVLayout,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    tier, client = _tier(small_layout, timeout_s=0.2)
    probe = _probe_in_flight(tier, client)
    tier.close()  # gives up waiting after timeout_s: the memory stays registered for now
    assert client.log == [] and "still running" in caplog.text
    client.release.set()
    probe.join()
    assert client.unregistered.wait(timeout=60)
    for _ in range(100):  # the release runs in the call's done-callback, right after the call ends
        if "close" in client.log:
            break
        threading.Event().wait(0.05)
    assert client.log == ["call ended", "unregister", "close"]
