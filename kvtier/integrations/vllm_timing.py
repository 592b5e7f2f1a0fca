"""What the worker times: vLLM's forwards (for the scheduler's cost model) and the host's waits in
vLLM's hooks (for the operator: a hook that blocks the step stalls every running request).

``ForwardTimer``: a forward is marked before it runs and after (``timing_mark``: CUDA events on a
GPU, read later without a sync; wall time on a CPU) and becomes a ``ForwardSample`` once done.

``HostWaits``: each place the step's thread blocks on kvtier is timed by cause and counted as
``wait_<cause>_s`` (seconds, waits of 1 ms or more) and ``wait_<cause>_long`` (waits of ``LONG_WAIT_S`` or more); a long
wait is logged at most once per ``LOG_EVERY_S`` with what it waited for.  Causes: ``flush`` (a
preempted request's saves and loads, before vLLM reuses its blocks), ``save`` (a DRAM hit whose
chunk an earlier step is still saving), ``load`` (this step's DRAM hits, at the step's end).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from kvtier.integrations.calibrate import ForwardSample

logger = logging.getLogger("vllm.kvtier")

MIN_WAIT_S = 0.001  # shorter waits are not counted
LONG_WAIT_S = 0.1  # a wait this long shows in a running request's inter-token latency
LOG_EVERY_S = 10.0


class ForwardTimer:
    """Forwards of (new tokens, attention pairs), timed with ``paged.timing_mark``/``elapsed``."""

    def __init__(self, paged: Any, keep: Callable[[ForwardSample], None]) -> None:
        self.paged = paged
        self._keep = keep  # called with each finished sample
        self._forward: tuple[Any, int, float] | None = None  # being timed: (start, new, pairs)
        self._timed: list[tuple[Any, Any, int, float]] = []  # CUDA: (start, end, ...) not yet read

    def starts(self, work: tuple[int, float] | None) -> None:
        """Before a forward of ``work`` = (new tokens, attention pairs); None: not timed."""
        self._forward = None if work is None else (self.paged.timing_mark(), *work)

    def ends(self) -> None:
        """After the forward (``wait_for_save``)."""
        if self._forward is None:
            return
        start, new, pairs = self._forward
        self._forward = None
        self._timed.append((start, self.paged.timing_mark(), new, pairs))
        self.read()

    def read(self) -> None:
        """Keep the forwards that are done; drop the oldest past 8 never read."""
        while self._timed:
            start, end, new, pairs = self._timed[0]
            seconds = self.paged.elapsed(start, end)
            if seconds is None:  # not done yet
                if len(self._timed) > 8:
                    self._timed.pop(0)
                return
            self._timed.pop(0)
            self._keep(ForwardSample(new, pairs, seconds))


class HostWaits:
    """Times the step thread's blocking waits by cause into ``count(**deltas)``."""

    def __init__(self, count: Callable[..., None]) -> None:
        self._count = count
        self._logged = -LOG_EVERY_S

    @contextlib.contextmanager
    def timed(self, cause: str, what: Callable[[], str]) -> Iterator[None]:
        """Time the block's wait; ``what`` (called only for a long wait) says what it waited for."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # counting must never stop the engine
                self._record(cause, time.perf_counter() - t0, what)

    def _record(self, cause: str, seconds: float, what: Callable[[], str]) -> None:
        if seconds < MIN_WAIT_S:
            return
        long = seconds >= LONG_WAIT_S
        self._count(**{f"wait_{cause}_s": seconds, **({f"wait_{cause}_long": 1} if long else {})})
        now = time.monotonic()
        if long and now - self._logged >= LOG_EVERY_S:
            self._logged = now
            logger.info("kvtier: the step waited %.3f s (%s): %s", seconds, cause, what())
