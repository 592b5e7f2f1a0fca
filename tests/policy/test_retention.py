"""Retention a request asks for (kvtier/policy/retention.py) and its effect on the agent policy."""

from __future__ import annotations

import math

import pytest

from kvtier.errors import ArgumentTypeError, ArgumentValueError
from kvtier.keys import ChunkKey
from kvtier.policy.agent import AgentPolicy
from kvtier.policy.index import TierIndex
from kvtier.policy.retention import Retention


def keys(prefix: str, n: int) -> list[ChunkKey]:
    return [ChunkKey(f"{prefix}{i}".encode().ljust(16, b".")) for i in range(n)]


def request(index: TierIndex, ks: list[ChunkKey], *, session: str, now: float,
            retention: Retention | None = None) -> None:
    """Hint, read what is cached, store the rest (as the hierarchy does)."""
    index.policy.observe(ks, session=session, now=now, retention=retention)
    for key in ks:
        if key in index:
            index.touch(key)
        elif (victims := index.plan_room(1, lambda _: True, admit=key)) is not None:
            index.add(key, 1)
            assert victims is not None


@pytest.mark.parametrize(("priority", "ttl", "want"), [
    (None, None, Retention()), ("high", None, Retention(1, None)), ("low", 30, Retention(-1, 30.0)),
    (7, 0.5, Retention(7, 0.5)), ("normal", None, Retention(0, None)),
])
def test_parse_reads_names_ints_and_seconds(priority: object, ttl: object, want: Retention) -> None:
    assert Retention.parse(priority, ttl) == want


@pytest.mark.parametrize(("priority", "ttl", "error", "message"), [
    ("urgent", None, ArgumentValueError, "x['priority'] must be one of low, normal, high or an int, got 'urgent'"),
    (True, None, ArgumentTypeError, "x['priority'] must be one of low, normal, high or an int, got True"),
    (1.5, None, ArgumentTypeError, "x['priority'] must be one of"),
    (101, None, ArgumentValueError, "x['priority'] must be in [-100, 100], got 101"),
    (None, 0, ArgumentValueError, "x['ttl_s'] must be a positive number of seconds, got 0"),
    (None, math.inf, ArgumentValueError, "x['ttl_s'] must be a positive number of seconds, got inf"),
    (None, "60", ArgumentTypeError, "x['ttl_s'] must be a positive number of seconds, got '60'"),
])
def test_parse_names_the_bad_field_in_one_line(priority: object, ttl: object, error: type[Exception],
                                              message: str) -> None:
    with pytest.raises(error) as info:
        Retention.parse(priority, ttl, where="x")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def _tier_with(retention: Retention | None) -> tuple[TierIndex, list[ChunkKey], list[ChunkKey]]:
    """A 4-chunk tier: session "kept" (with ``retention``) stored first, then "plain" (none),
    then pressure from newcomers that would win against both without retention."""
    index = TierIndex("g2", 4, AgentPolicy())
    kept, plain = keys("k", 2), keys("p", 2)
    request(index, kept, session="kept", now=0.0, retention=retention)
    request(index, plain, session="plain", now=1.0)
    return index, kept, plain


def _pressure(index: TierIndex, now: float) -> None:
    for i in range(4):  # a busy session (a rhythm of 1 s): expected back before both
        request(index, keys("n", 1 + i), session="busy", now=now + i)


def test_without_retention_the_older_idle_session_goes_first() -> None:
    index, kept, _ = _tier_with(None)
    _pressure(index, 2.0)
    assert not any(k in index for k in kept)


@pytest.mark.parametrize("retention", [Retention(priority=1), Retention(ttl_s=60.0)])
def test_a_high_priority_or_ttl_chunk_outlives_a_normal_one_under_pressure(retention: Retention) -> None:
    index, kept, plain = _tier_with(retention)
    _pressure(index, 2.0)
    assert all(k in index for k in kept)
    assert not all(k in index for k in plain)


def test_a_ttl_ends_and_its_chunks_go_back_to_their_priority() -> None:
    index, kept, _ = _tier_with(Retention(ttl_s=5.0))
    _pressure(index, 100.0)  # long after the ttl: nothing keeps them
    assert not any(k in index for k in kept)


def test_a_ttl_gives_way_to_a_higher_priority() -> None:
    index, kept, _ = _tier_with(Retention(ttl_s=600.0))
    request(index, keys("h", 4), session="vip", now=2.0, retention=Retention(priority=1))
    assert not any(k in index for k in kept)
    request(index, keys("l", 4), session="cheap", now=3.0, retention=Retention(priority=-1))
    assert all(k in index for k in keys("h", 4))  # a low priority is not admitted over them
