"""Compute and load at once: recompute the head of a slow-tier hit while its tail streams in.

``CostModel.plan(..., split=True)`` may answer "recompute chunks ``[0, c)`` while chunks
``[c, k)`` load" (see ``kvtier.policy.cost``).  ``run_split`` executes that on one request:

* a **loader** thread walks *backwards* from chunk ``k - 1``, a group of chunks at a time,
  ``reads_in_flight`` groups being read at once (so the tier's I/O never drains between
  groups): ``ContextMemory.borrow_prefix`` reads them (checksums; corrupt = miss) straight into
  reserved pinned DRAM slots, and each group, in order from the top, is queued to the device on
  the copy engine's load stream at once (``KVLoad.copy_chunks``), so the host-to-device copy
  hides under the head's compute too;
* the calling thread computes **forward** from chunk 0 into the first rows of the same tensors
  (a ``PromptCache``; the head needs no loaded KV): ``first_step_share`` of the plan's head in
  one forward (causal attention without a mask), then ``step_tokens`` at a time (``KVTierLM``
  runs them through a lower-right causal kernel rather than a mask: ``hf_attention``).

Both write the prompt's KV in place: the loader's copies land in the rows of their chunks
(``KVLoad``), the head's steps in theirs, so at the meeting nothing is copied or concatenated
and the suffix reads every row where it is.

``Fronts`` is where they meet.  Adaptive (the default): compute continues while there are
chunks the loader has not claimed, and the loader stops at the compute front, so a late
loader means more computed chunks and a late compute means the loaded region starts earlier
than ``c``; the plan's ``c`` is only the estimate.  At the meeting the compute waits for the
loader's last group rather than computing chunks being read; the loader's groups shrink as
the fronts close in (at most half the gap), so that wait is short.
``mode="planned"`` keeps the meeting point at ``c`` (deterministic: benchmarks of the plan,
tests).  Either way the result is exact: the loaded region is a contiguous ``[f, k)`` of chunks
that passed their checksums, the computed one ``[0, f)``; a group with a failed chunk ends the
loader there, and the compute covers it.

On CUDA the compute side keeps at most two steps queued (it waits for step ``i - 1`` after
queueing step ``i``), so the front it publishes is never far ahead of the GPU; in adaptive mode
each step after the first is sized to the compute side's share of what is left (``Pacer``), so
near the meeting the steps shrink and neither side idles while the other finishes.
``SplitTimings`` records where the time went (head, loader, the wait at the meeting, the last
host-to-device copy), for benchmarks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from kvtier.errors import IntegrationError
from kvtier.hierarchy import ContextMemory
from kvtier.integrations.hf_cache import PromptCache
from kvtier.keys import ChunkKey
from kvtier.tiers.cuda import CopyEngine, KVLoad


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitOptions:
    """How ``KVTierLM`` executes a compute + load split."""

    mode: Literal["adaptive", "planned"] = "adaptive"  # planned: meet exactly at the plan's c
    step_tokens: int = 2048  # tokens per forward call of the head (rounded to whole chunks)
    group_chunks: int = 4  # chunks per loader read (read in parallel by the disk tier's I/O pool)
    # groups being read at once: the next group's reads start while the last one's finish, so the
    # tier's I/O pool never drains between groups (deliveries stay in order, from the end back)
    reads_in_flight: int = 2
    # the head's first step covers this share of the plan's head at once: one forward from token
    # 0 runs causal attention without a mask (flash), the steps after it attend to their past
    # through a mask, measured ~1.6x slower per attention FLOP (H200); the plan's head is an
    # estimate, so the rest stays in steps that adapt to the loader
    first_step_share: float = 0.75

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "planned"):
            raise IntegrationError(f"SplitOptions.mode must be 'adaptive' or 'planned', got {self.mode!r}")
        if self.step_tokens < 1 or self.group_chunks < 1 or self.reads_in_flight < 1:
            raise IntegrationError("SplitOptions.step_tokens, group_chunks and reads_in_flight must be >= 1")
        if not 0 <= self.first_step_share <= 1:
            raise IntegrationError(f"SplitOptions.first_step_share must be in [0, 1], got {self.first_step_share}")


DEFAULT_SPLIT = SplitOptions()


class Fronts:
    """The compute front (forward from chunk 0) and the loaded front (backward from ``end``).

    ``computed``: chunks ``[0, computed)`` are computed or queued to be; ``loaded``: chunks
    ``[loaded, end)`` are read and queued to the device; ``reading``: the lowest group claimed
    (being read) starts there; the groups in flight lie in ``[reading, loaded)`` and are
    delivered in order, from the top.  The loader never goes below ``floor`` nor below the
    compute front.  The compute side stops at ``reading``, not at ``loaded``: computing a group
    in flight would waste its read and still wait for it (its borrows must end before the
    request does).
    """

    def __init__(self, end: int, *, floor: int = 0) -> None:
        self.end = end
        self.floor = floor
        self.computed = 0
        self.loaded = self.reading = end
        self.failed_at: int | None = None  # first chunk of the group that failed to load
        self.stopped = False
        self._lock = threading.Lock()

    def claim_load(self, group: int) -> tuple[int, int] | None:
        """The next group for the loader, ``[lo, hi)``; None: stop (met the compute front).

        At most half the chunks left between the fronts (at least one): near the meeting the
        compute side soon waits for the group in flight, so it should be short.
        """
        with self._lock:
            base = max(self.computed, self.floor)
            size = min(group, max(1, (self.reading - base) // 2))
            lo = max(base, self.reading - size)
            if self.stopped or lo >= self.reading:
                self.stopped = True
                return None
            hi, self.reading = self.reading, lo
            return lo, hi

    def delivered(self, lo: int) -> None:
        with self._lock:
            self.loaded = lo

    def failed(self, at: int) -> None:
        """A chunk of the next group to deliver could not be loaded: the loaded region stays where
        it was, and the groups in flight below it are given up (the compute covers them)."""
        with self._lock:
            self.failed_at, self.stopped, self.reading = at, True, self.loaded

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def claim_compute(self, step: int, *, until: int | None = None) -> tuple[int, int] | None:
        """The next chunks to compute, ``[lo, hi)``, up to the group in flight (and ``until``)."""
        with self._lock:
            limit = self.reading if until is None else min(until, self.reading)
            if self.computed >= limit:
                return None
            lo, self.computed = self.computed, min(self.computed + step, limit)
            return lo, self.computed


@dataclass(slots=True)
class SplitTimings:
    """Where a split's time went, from the start of ``run_split``; ``seconds()`` reads it out.

    Host clocks for the two threads; on CUDA also device events (on the compute stream: the start
    and the end of the head; on the load stream: the last host-to-device copy), read once the
    request is done (``seconds`` waits for them).
    """

    head_queued_s: float = 0.0  # the compute side had queued its last head step (host)
    waited_s: float = 0.0  # the compute side then blocked for the loader's last group (host)
    met_s: float = 0.0  # both fronts had stopped: the suffix could be queued (host)
    loader_done_s: float = 0.0  # the loader thread returned (host)
    read_s: float = 0.0  # time in reads (tier -> DRAM slots, checksums), summed over groups (they overlap)
    queue_s: float = 0.0  # loader time queueing the groups' host-to-device copies
    groups: int = 0  # groups the loader read
    events: tuple[Any, Any, Any] | None = None  # CUDA: (start, head end, last copy) events

    def seconds(self) -> dict[str, float]:
        """The fields as a dict, plus on CUDA ``head_done_s``, ``h2d_done_s`` (device clock) and
        ``suffix_wait_s`` (how long after the head the last loaded chunk reached the device)."""
        out = {name: float(getattr(self, name)) for name in ("head_queued_s", "waited_s", "met_s",
                                                                "loader_done_s", "read_s", "queue_s")}
        out["groups"] = self.groups
        if self.events is not None:
            start, head, h2d = self.events
            h2d.synchronize()
            head.synchronize()
            out["head_done_s"] = start.elapsed_time(head) / 1e3
            out["h2d_done_s"] = start.elapsed_time(h2d) / 1e3
            # the suffix's first layer waits on the device for the last copy, if it is still running
            out["suffix_wait_s"] = max(0.0, out["h2d_done_s"] - out["head_done_s"])
        return out


@dataclass(slots=True)
class SplitOutcome:
    cache: PromptCache  # KV of chunks [0, end): computed head, then the loaded region
    load: KVLoad | None  # the copies of the loaded region (wait_host before borrows end)
    computed_chunks: int  # the meeting point f: chunks [0, f) were computed
    end: int  # chunks [f, end) were loaded
    failed_at: int | None  # first chunk that failed to load (it was computed instead), if any
    timings: SplitTimings


def run_split(model: Any, memory: ContextMemory, engine: CopyEngine, ids: torch.Tensor,
              keys: Sequence[ChunkKey], *, compute_chunks: int, end: int, options: SplitOptions,
              borrows: contextlib.ExitStack, pool: ThreadPoolExecutor) -> SplitOutcome:
    """Compute chunks ``[0, f)`` of ``ids`` while loading ``[f, end)``; see the module docstring.

    ``borrows`` receives the DRAM borrows of the loaded chunks: the caller keeps it open until
    ``outcome.load.wait_host()``.  ``pool`` runs the loader (one thread).
    """
    c = memory.layout.tokens_per_chunk
    adaptive = options.mode == "adaptive"
    timings = SplitTimings()
    t0 = time.perf_counter()
    start_event = _timing_event(engine, torch.cuda.current_stream(engine.device) if engine.is_cuda else None)
    fronts = Fronts(end, floor=0 if adaptive else compute_chunks)
    # every layer of the whole prompt's KV, allocated now: the head is computed into its first
    # rows while the loader's copies land in the last ones
    load = engine.start_load(end, tokens=len(ids), layerwise=False)
    cache = PromptCache(load)
    loader = pool.submit(_load_backwards, memory, engine, load, keys, fronts, options, borrows, timings, t0)
    step = max(1, options.step_tokens // c)
    first = max(step, int(options.first_step_share * compute_chunks))
    queued: list[tuple[Any, int]] = []  # the steps in flight: (event (CUDA), last chunk + 1)
    try:
        with torch.no_grad():
            _compute(model, engine, ids, cache, fronts, step, c, queued, until=None if adaptive else compute_chunks,
                     first=first, pacer=Pacer(fronts) if adaptive else None)
            timings.head_queued_s = time.perf_counter() - t0
            loader.result()  # the loader has stopped: at the compute front, the floor or a failure
            timings.waited_s = time.perf_counter() - t0 - timings.head_queued_s
            _compute(model, engine, ids, cache, fronts, step, c, queued, until=None)  # any gap left
    except BaseException:
        fronts.stop()
        loader.exception()  # wait for the loader; then no copy may still read a borrowed slot
        load.wait_host()
        raise
    load.finish()
    if start_event is not None:
        timings.events = (start_event, _timing_event(engine, torch.cuda.current_stream(engine.device)),
                          _timing_event(engine, engine.load_stream))
    timings.met_s = time.perf_counter() - t0
    f = fronts.computed
    if f >= end:
        load.wait_host()  # nothing of it is used; its host sources may be released once read
        return SplitOutcome(cache, None, f, end, fronts.failed_at, timings)
    cache.attach(end * c)  # rows [0, f*C) computed in place, [f*C, end*C) loaded
    return SplitOutcome(cache, load, f, end, fronts.failed_at, timings)


def _timing_event(engine: CopyEngine, stream: Any) -> Any:
    if not engine.is_cuda:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _compute(model: Any, engine: CopyEngine, ids: torch.Tensor, cache: PromptCache, fronts: Fronts,
             step: int, c: int, queued: list[tuple[Any, int]], *, until: int | None, first: int | None = None,
             pacer: Pacer | None = None) -> None:
    """Forward steps of ``step`` chunks (the first of ``first``) up to the fronts' limit; with a
    ``pacer``, each later step sized to the compute side's share of what is left (``Pacer``)."""
    device = engine.device
    size = first or step
    while (span := fronts.claim_compute(size, until=until)) is not None:
        lo, hi = span
        model(input_ids=ids[lo * c:hi * c].to(device)[None, :], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        queued.append((engine.record_now(), hi))
        if len(queued) > 1:  # keep two steps in flight: the published front stays near the GPU's
            _retire(engine, queued, pacer)
        if pacer is None:
            size = step
            continue
        size = pacer.size(step)
        if size == 0:  # the loader should reach this front before the GPU has worked off its queue
            while queued:
                _retire(engine, queued, pacer)
            size = max(1, pacer.size(step))  # the GPU is idle: its share of the rest


def _retire(engine: CopyEngine, queued: list[tuple[Any, int]], pacer: Pacer | None) -> None:
    event, hi = queued.pop(0)
    engine.wait(event)
    if pacer is not None:
        pacer.computed(hi)


class Pacer:
    """Sizes the head's steps so that both fronts stop together (adaptive mode).

    The front the loader sees runs ahead of the GPU by the steps in flight; a full step claimed
    near the meeting leaves the disk idle while the GPU catches up (H200, 64K: the loader done
    0.4 s before the head).  So each step is the compute side's share of the chunks still
    unclaimed once the GPU has worked off its queue, ``gap x r_c / (r_c + r_l)``, from the two
    measured rates (chunks per second: the GPU's between step completions, the loader's since
    the start); 0: leave the rest to the loader for now.
    """

    def __init__(self, fronts: Fronts, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._fronts = fronts
        self._clock = clock
        self._t0 = self._done_t = clock()
        self._done = fronts.computed  # the GPU's front: steps up to here have completed
        self._rate: float | None = None  # the GPU's chunks per second, over the last completed step

    def computed(self, hi: int) -> None:
        """A step ending at chunk ``hi`` completed (seen now)."""
        now = self._clock()
        if now > self._done_t and hi > self._done:
            self._rate = (hi - self._done) / (now - self._done_t)
        self._done, self._done_t = hi, now

    def size(self, step: int) -> int:
        """The next step, at most ``step`` chunks; 0: none for now."""
        fronts = self._fronts
        loaded = fronts.end - fronts.loaded
        elapsed = self._clock() - self._t0
        if self._rate is None or loaded == 0 or elapsed <= 0:
            return step  # nothing measured yet
        load_rate = loaded / elapsed
        queued_s = (fronts.computed - self._done) / self._rate  # the GPU's work already queued
        gap = fronts.reading - fronts.computed - load_rate * queued_s
        return max(0, min(step, int(gap * self._rate / (self._rate + load_rate))))


def _load_backwards(memory: ContextMemory, engine: CopyEngine, load: KVLoad, keys: Sequence[ChunkKey],
                    fronts: Fronts, options: SplitOptions, borrows: contextlib.ExitStack,
                    timings: SplitTimings, t0: float) -> None:
    """The loader thread: groups of chunks from the end towards the compute front, up to
    ``options.reads_in_flight`` being read at once (by reader threads), queued to the device in
    order.  After a failed group nothing below it is queued: its rows are the compute's."""
    ctx = torch.cuda.device(engine.device) if engine.is_cuda else contextlib.nullcontext()
    lock = threading.Lock()  # one ExitStack of borrows, entered from the reader threads
    inflight: deque[tuple[int, int, Future[list[np.ndarray]]]] = deque()
    try:
        with ctx, ThreadPoolExecutor(options.reads_in_flight, thread_name_prefix="kvtier-split-read") as readers:
            while True:
                while len(inflight) < options.reads_in_flight and (
                        span := fronts.claim_load(options.group_chunks)) is not None:
                    lo, hi = span
                    inflight.append((lo, hi, readers.submit(_read, memory, keys[lo:hi], borrows, lock, timings)))
                if not inflight:
                    return
                lo, hi, future = inflight.popleft()
                views = future.result()
                if len(views) < hi - lo:
                    fronts.failed(lo + len(views))
                    return  # leaving the pool waits for the reads still in flight (their borrows)
                t_queue = time.perf_counter()
                load.copy_chunks(views, first=lo)
                timings.queue_s += time.perf_counter() - t_queue
                fronts.delivered(lo)
    finally:
        timings.loader_done_s = time.perf_counter() - t0


def _read(memory: ContextMemory, keys: Sequence[ChunkKey], borrows: contextlib.ExitStack, lock: threading.Lock,
          timings: SplitTimings) -> list[np.ndarray]:
    """Host views of ``keys`` (the longest readable prefix): DRAM slots, promoted in place.

    The read happens outside ``lock`` (reads of several groups overlap); only the borrow's
    registration in ``borrows`` is under it."""
    t_read = time.perf_counter()
    held = memory.borrow_prefix(keys)
    views = list(held.__enter__())
    try:
        if len(views) < len(keys):  # no DRAM top tier (or promotion off), or a borrow missed: plain buffers
            rest = [np.empty(memory.layout.chunk_bytes, np.uint8) for _ in keys[len(views):]]
            views += rest[:memory.load(keys[len(views):], rest)]
    except BaseException:
        held.__exit__(*sys.exc_info())
        raise
    with lock:
        borrows.push(held)  # released with the request's other borrows
        timings.read_s += time.perf_counter() - t_read
        timings.groups += 1
    return views
