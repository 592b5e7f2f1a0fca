"""The circuit breaker's rules, on a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from kvtier.config import BreakerConfig
from kvtier.errors import ConfigError
from kvtier.tiers.breaker import BreakerMode, BreakerState, CircuitBreaker, backoff_s
from tests.conftest import FakeClock

CFG = BreakerConfig(failure_threshold=3, base_backoff_s=0.5, max_backoff_s=4.0)


def test_stays_closed_below_the_threshold_and_success_resets() -> None:
    b = CircuitBreaker(CFG, clock=FakeClock(100.0))
    b.record_failure()
    b.record_failure()
    assert b.mode is BreakerMode.CLOSED and b.allow()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.mode is BreakerMode.CLOSED  # the count restarted after the success


def test_opens_refuses_then_admits_exactly_one_probe() -> None:
    clock = FakeClock(100.0)
    b = CircuitBreaker(CFG, clock=clock)
    for _ in range(3):
        b.record_failure()
    assert b.mode is BreakerMode.OPEN and b.num_trips == 1
    assert not b.allow()
    clock.now += 0.49
    assert not b.allow()
    clock.now += 0.02
    assert b.mode is BreakerMode.HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # everyone else waits for the probe's result
    b.record_success()
    assert b.mode is BreakerMode.CLOSED and b.allow() and b.allow()


def test_failed_probes_double_the_backoff_up_to_the_cap() -> None:
    clock = FakeClock(100.0)
    b = CircuitBreaker(CFG, clock=clock)
    for _ in range(3):
        b.record_failure()
    waits = []
    for _ in range(6):
        opened_at = clock.now
        waits.append(b.state.open_until - opened_at)
        clock.now = b.state.open_until
        assert b.allow()
        b.record_failure()  # the probe fails: open again, longer
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.num_trips == 7


def test_state_is_an_immutable_value() -> None:
    s = BreakerState()
    s2 = s.failed(0.0, BreakerConfig(failure_threshold=1))
    assert s == BreakerState() and s2.trips == 1 and s2.mode(0.0) is BreakerMode.OPEN
    with pytest.raises(AttributeError):
        s.failures = 3  # type: ignore[misc]


def test_backoff_formula_and_config_validation() -> None:
    assert [backoff_s(t, CFG) for t in (1, 2, 3, 10, 10_000)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    with pytest.raises(ConfigError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ConfigError):
        BreakerConfig(base_backoff_s=5, max_backoff_s=1)
