"""Prefetch during pauses: bring a session's chunks back into DRAM while its agent runs a tool.

An answer that ends in a tool call is followed by the session's next call seconds later (the
tool's run time); a chunk of that session demoted to disk would meet the call with a disk read.
So when ``ContextMemory.hint_end(session, awaits="tool")`` says the pause began, the session's
last request's chunks that sit below the top tier (G3 disk, G4 shared) are **promoted** into the
top tier (G2 DRAM) in the background, in prefix order, before the call comes.  What keeps this
from hurting the rest:

* **a share**: chunks prefetched and not yet read fill at most ``dram_share`` of the top tier
  (``PrefetchConfig.dram_share``);
* **never a hotter victim**: a prefetched chunk takes free room, or the room of a chunk the
  eviction policy ranks colder (``EvictionPolicy.colder``: predicted to be needed after it); a
  policy that predicts nothing (LRU, S3-FIFO) lets a prefetch take free room only.  The first
  chunk that finds no such room ends the job (deeper chunks are due no sooner);
* **cancel on pressure**: a foreground store or load that evicts a prefetched chunk before it was
  read stops every prefetch queued or running (the room is needed now);
* **back off when unread**: a pause is skipped while the recent prefetched chunks (counts decaying
  by ``_DECAY`` per pause) went unread more than ``_BACKOFF`` times as often as they were read, once
  there is a share's worth of evidence.  A DRAM that turns over between a session's calls (many
  sessions, a small share) evicts what a prefetch brings before its session returns: simulated with
  16 agents 3.9 s apart at G2 2%, 91% of prefetched chunks went unread and TTFT rose
  (``docs/benchmarks.md``).  Skipped pauses let the evidence fade, so a later pause probes again.

Counted (``PrefetchStats``): chunks prefetched, **used** (read from the top tier before leaving
it) and **wasted** (evicted unread), jobs cancelled, and pauses skipped.  Control only: the bytes
move through the hierarchy's own reserve -> fill -> commit path (``Mover.reserve`` / ``finish``), on one
background thread of its own, so a prefetch never waits behind write-through.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from kvtier.keys import ChunkKey

if TYPE_CHECKING:
    from kvtier.hierarchy import ContextMemory

log = logging.getLogger(__name__)
_THREAD = "kvtier-prefetch"
_MAX_SESSIONS = 4096  # sessions whose last keys are remembered (least recently hinted forgotten first)
_DECAY = 0.97  # per pause, the weight left to earlier prefetched chunks' outcomes
_BACKOFF = 2.0  # skip a pause while recent prefetched chunks went unread this many times as often as read
_EVIDENCE = 0.125  # ... and at least this share of ``limit`` of them did


@dataclass(slots=True)
class PrefetchStats:
    prefetched: int = 0  # chunks promoted into the top tier by a prefetch
    used: int = 0  # ... and read from there before they left it
    wasted: int = 0  # ... and evicted (or deleted) unread
    cancelled: int = 0  # jobs stopped early by pressure (a foreground eviction of a prefetched chunk)
    failed: int = 0  # jobs that raised (logged; the cache is unharmed)
    skipped: int = 0  # pauses not prefetched: recent prefetched chunks mostly went unread (back-off)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Prefetcher:
    """The prefetches of one ``ContextMemory`` (see the module docstring); ``dram_share`` 0: off."""

    def __init__(self, memory: ContextMemory, dram_share: float) -> None:
        self.memory = memory
        self.stats = PrefetchStats()
        top = memory.tiers[0]
        on = dram_share > 0 and top.capabilities.slots and len(memory.tiers) > 1  # DRAM: a promotion fills a slot
        self.limit = int(dram_share * top.capacity_bytes) // memory.chunk_bytes if on else 0  # chunks unread
        self._sessions: OrderedDict[str, tuple[ChunkKey, ...]] = OrderedDict()  # each session's last keys
        self._fresh: set[ChunkKey] = set()  # prefetched, unread, in the top tier
        self._lock = threading.Lock()
        self._generation = 0  # bumped by pressure: jobs of an older one stop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD) if self.limit else None
        self._jobs: list[Future[None]] = []
        self._recent_used = self._recent_wasted = 0.0  # outcomes of prefetched chunks, decaying per pause

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    # --- told by the hierarchy ----------------------------------------------------------------
    def note(self, session: str | None, keys: Sequence[ChunkKey]) -> None:
        """``session``'s latest request reads ``keys`` (``ContextMemory.hint``)."""
        if session is None or not keys or not self.enabled:  # a prompt shorter than a chunk: keep the last
            return
        with self._lock:
            self._sessions[session] = tuple(keys)
            self._sessions.move_to_end(session)
            while len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def start(self, session: str) -> Future[None] | None:
        """The session pauses and returns soon: prefetch its last request's chunks (background)."""
        with self._lock:
            keys = self._sessions.get(session)
            if self._pool is None or not keys:
                return None
            self._jobs = [job for job in self._jobs if not job.done()]
            self._recent_used *= _DECAY
            self._recent_wasted *= _DECAY
            if self._recent_wasted >= _EVIDENCE * self.limit and self._recent_wasted > _BACKOFF * self._recent_used:
                self.stats.skipped += 1  # what it brings is evicted before its session returns: back off
                return None
            generation = self._generation
            try:
                job = self._pool.submit(self._run, keys, generation)
            except RuntimeError:  # closing
                return None
            self._jobs.append(job)
            return job

    def served(self, keys: Sequence[ChunkKey], levels: Sequence[int]) -> None:
        """``keys[i]`` was read from tier ``levels[i]`` (``ContextMemory.account_load``)."""
        if not self._fresh:
            return
        with self._lock:
            for key, level in zip(keys, levels, strict=False):
                if level == 0 and key in self._fresh:
                    self._fresh.discard(key)
                    self.stats.used += 1
                    self._recent_used += 1

    def left(self, keys: Sequence[ChunkKey]) -> None:
        """``keys`` left the top tier (evicted or deleted)."""
        if not self._fresh:
            return
        with self._lock:
            wasted = self._fresh.intersection(keys)
            self._fresh -= wasted
            self.stats.wasted += len(wasted)
            self._recent_wasted += len(wasted)
            if wasted and not threading.current_thread().name.startswith(_THREAD):
                self._generation += 1  # pressure: the foreground needs the room a prefetch took

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for the prefetches queued so far; False if ``timeout`` passed first."""
        with self._lock:
            jobs = list(self._jobs)
        return not wait(jobs, timeout=timeout).not_done

    def close(self) -> None:
        """Finish the jobs queued (at most ``dram_share`` of DRAM to read), then take no more."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # --- the job ----------------------------------------------------------------------------
    def _run(self, keys: tuple[ChunkKey, ...], generation: int) -> None:
        try:
            hit = self.memory.lookup(keys)  # the cached prefix and where each chunk is (G4 probed)
            for key, level in zip(keys, hit.tiers, strict=False):
                with self._lock:
                    if generation != self._generation:
                        self.stats.cancelled += 1
                        return
                    full = len(self._fresh) >= self.limit
                if full and not self._prune():
                    return
                if level > 0 and not self._promote(key, level):
                    return
        except Exception as exc:  # a tier's bug must not kill the thread or reach a caller
            with self._lock:
                self.stats.failed += 1
            log.warning("prefetch failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def _prune(self) -> bool:
        """Forget prefetched chunks the top tier lost without telling (deleted, failed a read);
        True if there is room in the share now."""
        with self.memory._lock:
            top = set(self.memory.indexes[0].sizes)
        with self._lock:
            self._fresh &= top
            return len(self._fresh) < self.limit

    def _promote(self, key: ChunkKey, level: int) -> bool:
        """Read ``key`` from tier ``level`` into a top-tier slot taken from free room or a colder
        chunk; False when there is no such room (or the read failed): the job ends."""
        memory = self.memory
        index = memory.indexes[0]
        policy = index.policy
        if not policy.ranks:  # free room only; no victim search (S3-FIFO's would reorder its queues)
            with memory._lock:
                if index.used_bytes + memory.chunk_bytes > index.capacity_bytes:
                    return False

        def colder(victim: ChunkKey) -> bool:  # called under the hierarchy's lock
            return policy.ranks and memory.directory.evictable(0, victim) and policy.colder(victim, key)

        res = memory.mover.reserve([key], evictable=colder)
        if res.present:
            return True  # a foreground load promoted it meanwhile
        if not res.slotted:
            return False  # spilled: no room that is not hotter
        view = res.buffer(0)
        try:
            good = memory.tiers[level].get_into(key, view)
        except BaseException:
            memory.mover.finish(res, publish=False)
            raise
        if not good:  # gone or corrupt below (the tier counted it): the prefix ends here
            memory.mover.finish(res, publish=False)
            return False
        memory.mover.finish(res, publish=True)
        memory.tiers[0].stats.promotions += 1
        with self._lock:
            self._fresh.add(key)
            self.stats.prefetched += 1
        if memory.exclusive:  # as a promotion: the copy below goes (DRAM demotes it again if evicted)
            with contextlib.suppress(Exception):
                memory.mover.drop_below([key])
        return True
