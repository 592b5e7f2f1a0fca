"""A circuit breaker for remote tiers: stop asking a server that is down, retry after a backoff.

States::

    CLOSED ──N consecutive failures──▶ OPEN ──backoff elapsed──▶ HALF_OPEN (one probe at a time)
       ▲                                 ▲                              │
       └────────── probe succeeds ───────┼──────────────────────────────┘
                                         └──── probe fails: backoff doubles (capped) ──┘

``BreakerState`` is an immutable value with pure transitions that take the current time, so
every rule is testable without sleeping or threads.  ``CircuitBreaker`` holds one state behind
a lock and reads an injectable clock; a tier asks ``allow()`` before an operation and reports
``record_success()`` / ``record_failure()`` after it.  Nothing here sleeps: while the breaker is
open a tier answers a miss at once instead of waiting for a socket timeout, which is what keeps
an engine's time to first token flat while a shard or master is gone.  Recovery needs no
background thread: the first request after the backoff becomes the probe.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from kvtier.config.schema import BreakerConfig


class BreakerMode(enum.Enum):
    CLOSED = "closed"  # requests flow
    OPEN = "open"  # requests are refused until the backoff ends
    HALF_OPEN = "half_open"  # one probe request is in flight; others are refused


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One breaker's state; transitions return a new value."""

    failures: int = 0  # consecutive failures since the last success
    trips: int = 0  # consecutive openings without a success in between (backoff exponent)
    open_until: float = 0.0  # clock time at which an open breaker admits a probe
    probing: bool = False  # a half-open probe is in flight

    def mode(self, now: float) -> BreakerMode:
        if self.trips == 0:
            return BreakerMode.CLOSED
        if self.probing or now >= self.open_until:
            return BreakerMode.HALF_OPEN
        return BreakerMode.OPEN

    def admit(self, now: float) -> tuple[bool, BreakerState]:
        """Whether a request may go out now, and the state after admitting it."""
        mode = self.mode(now)
        if mode is BreakerMode.CLOSED:
            return True, self
        if mode is BreakerMode.HALF_OPEN and not self.probing:
            return True, replace(self, probing=True)
        return False, self

    def succeeded(self) -> BreakerState:
        return BreakerState()

    def failed(self, now: float, config: BreakerConfig) -> BreakerState:
        failures = self.failures + 1
        if self.trips == 0 and failures < config.failure_threshold:
            return replace(self, failures=failures)
        trips = self.trips + 1  # a failed probe, or the threshold reached: (re)open
        return BreakerState(failures=failures, trips=trips, open_until=now + backoff_s(trips, config))


def backoff_s(trips: int, config: BreakerConfig) -> float:
    """Seconds an opened breaker waits before a probe: base * 2**(trips-1), capped."""
    return min(config.max_backoff_s, config.base_backoff_s * 2.0 ** max(0, min(trips - 1, 62)))


class CircuitBreaker:
    """Thread-safe holder of a ``BreakerState`` with a clock (``time.monotonic`` by default)."""

    def __init__(self, config: BreakerConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState()
        self._lock = threading.Lock()
        self.num_trips = 0  # times the breaker opened (for stats)

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def mode(self) -> BreakerMode:
        return self._state.mode(self._clock())

    def allow(self) -> bool:
        """Whether to send a request now; a True in half-open mode makes the caller the probe."""
        with self._lock:
            ok, self._state = self._state.admit(self._clock())
            return ok

    def record_success(self) -> None:
        with self._lock:
            self._state = self._state.succeeded()

    def record_failure(self) -> None:
        with self._lock:
            before = self._state.trips
            self._state = self._state.failed(self._clock(), self.config)
            if self._state.trips > before:
                self.num_trips += 1

    def __repr__(self) -> str:
        s = self._state
        return f"CircuitBreaker({self.mode.value}, failures={s.failures}, trips={s.trips})"


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time by which a whole tier call must end (every read, write and wait inside it).

    A socket timeout bounds one read; a server that trickles one byte per read never hits it.
    A remote tier takes one ``Deadline`` per call and bounds each wait by ``remaining()``.
    """

    at: float  # clock time (``clock`` below) when the call gives up
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at
