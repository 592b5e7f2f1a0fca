"""The scheduler's view of which chunks the engine's kvtier holds (no payloads): ``ChunkDirectory``.

The worker owns the one ``ContextMemory`` of the engine; the scheduler (EngineCore process) sees
a mirror of the worker's index (the changes it reports every step), the saves planned and not yet
reported, a ``stat`` of the shared disk root and a deadline-bound probe of Redis/Mooncake (see
``ChunkDirectory``).  A stale answer costs time, never correctness: the worker reports the blocks
it could not load and vLLM recomputes them (``kvtier.integrations.vllm_plan``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier
from kvtier.tiers.disk_files import chunk_path


@dataclass(frozen=True, slots=True)
class Match:
    """The longest prefix of a request's chunks the engine's kvtier can load."""

    levels: tuple[int, ...]  # tier level of each chunk (0: the worker's DRAM, or a save in flight)
    saving: tuple[int, ...] = ()  # indices of the chunks whose save is still in flight

    @property
    def chunks(self) -> int:
        return len(self.levels)

    @property
    def below_dram(self) -> bool:
        """Some chunks are not in the worker's DRAM: an I/O-bound, asynchronous load."""
        return any(level > 0 for level in self.levels)


class ChunkDirectory:
    """Which chunks the engine's kvtier holds, as far as the scheduler can tell (no payloads).

    The worker owns the hierarchy; this is its mirror, one step late at most:

    * ``apply(changes)``: every chunk entering or leaving a tier of a worker (``WorkerReport``:
      (rank, tier, key, added), including the start-up scan of the disk), so an eviction is
      seen at the next step, never planned against;
    * ``planned``: saves sent to the worker whose report has not come back yet (the worker runs
      jobs in order, so an async load planned after them finds them: ``Match.saving``);
    * a ``stat`` of the chunk's file on the shared disk root (another engine on this node may
      have written it; no in-memory index, so never stale);
    * a batched ``contains`` on the remote tiers (Redis, Mooncake), on a background thread: a
      lookup waits for it at most ``probe_deadline_s``; a late answer is cached for the next
      lookups (positive and negative, for ``probe_ttl_s``) and a hung server costs the scheduler
      loop at most one deadline per probe, not one per request per step.

    With tensor parallelism each rank stores its own shard of heads: a chunk is held only where
    every rank holds it.
    """

    def __init__(self, tiers: Sequence[str], *, world_size: int = 1, disk_roots: Sequence[Path] = (),
                 remote: Sequence[Sequence[Tier]] = (), probe_deadline_s: float = 0.02,
                 probe_ttl_s: float = 2.0, max_planned: int = 1 << 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = list(tiers)  # names, top first
        self.full = (1 << world_size) - 1
        self.disk_roots = list(disk_roots)  # one per rank
        self.remote = [list(r) for r in remote]  # per rank: shared tiers to probe
        self.held: dict[ChunkKey, dict[str, int]] = {}  # key -> tier name -> bitmask of ranks
        self.planned: OrderedDict[ChunkKey, None] = OrderedDict()
        self._max_planned = max_planned
        self._deadline = probe_deadline_s
        self._ttl = probe_ttl_s
        self._clock = clock
        self._remote_seen: dict[ChunkKey, tuple[bool, float]] = {}  # key -> (found, until)
        self._seen_lock = threading.Lock()  # the prober thread writes _remote_seen
        self._probe: Future[list[bool]] | None = None
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-probe") if self.remote else None

    # --- what the worker reports --------------------------------------------------------------
    def apply(self, changes: Sequence[tuple[int, str, ChunkKey, bool]]) -> None:
        for rank, tier, key, added in changes:
            bit = 1 << rank
            where = self.held.get(key)
            if added:
                if where is None:
                    where = self.held[key] = {}
                where[tier] = where.get(tier, 0) | bit
                self.planned.pop(key, None)
            elif where is not None:
                mask = where.get(tier, 0) & ~bit
                if mask:
                    where[tier] = mask
                else:
                    where.pop(tier, None)
                    if not where:
                        del self.held[key]

    def forget(self, keys: Iterable[ChunkKey]) -> None:
        """Chunks a worker could not load or store: plan no more loads of them."""
        with self._seen_lock:
            for key in keys:
                self.planned.pop(key, None)
                self._remote_seen.pop(key, None)

    def plan_save(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self.planned[key] = None
        while len(self.planned) > self._max_planned:
            self.planned.popitem(last=False)

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self.planned or self._level(key) is not None

    def _level(self, key: ChunkKey) -> int | None:
        where = self.held.get(key)
        if where:
            for level, tier in enumerate(self.tiers):
                if where.get(tier) == self.full:
                    return level
        return None

    # --- lookups ------------------------------------------------------------------------------
    def longest_prefix(self, keys: Sequence[ChunkKey]) -> Match:
        """Leading ``keys`` held: the worker's mirror first, then the shared disk, then remote tiers."""
        levels: list[int] = []
        saving: list[int] = []
        while len(levels) < len(keys):
            key = keys[len(levels)]
            if key in self.planned:  # a save in flight lands in the worker's DRAM first
                saving.append(len(levels))
                levels.append(0)
                continue
            level = self._level(key)
            if level is None:
                break
            levels.append(level)
        disk = self.tiers.index("disk") if "disk" in self.tiers else len(self.tiers)
        while len(levels) < len(keys) and self.disk_roots and all(
                chunk_path(r, keys[len(levels)]).exists() for r in self.disk_roots):
            levels.append(disk)
        if len(levels) < len(keys) and self.remote:
            remote = next((lv for lv, t in enumerate(self.tiers) if t not in ("dram", "disk")), len(self.tiers))
            levels += [remote] * self._remote_prefix(keys[len(levels):])
        return Match(tuple(levels), tuple(saving))

    def _remote_prefix(self, keys: Sequence[ChunkKey], batch: int = 64) -> int:
        now = self._clock()
        n = 0
        with self._seen_lock:
            while n < len(keys):
                seen = self._remote_seen.get(keys[n])
                if seen is None or seen[1] < now:
                    break
                if not seen[0]:
                    return n
                n += 1
        if n == len(keys):
            return n
        if self._probe is not None and not self._probe.done():
            return n  # a probe is still out (a slow or hung server): do not wait behind it
        window = list(keys[n:n + batch])
        assert self._prober is not None
        probe = self._probe = self._prober.submit(self._contains, window)
        probe.add_done_callback(lambda f: self._remember(window, f))
        try:
            found = probe.result(timeout=self._deadline)
        except Exception:  # late (answered later, remembered for the next lookups) or failed
            return n
        extra = 0
        while extra < len(found) and found[extra]:
            extra += 1
        return n + extra

    def _contains(self, keys: list[ChunkKey]) -> list[bool]:
        """Per key: does every rank's shard sit in some remote tier?"""
        found = [True] * len(keys)
        for tiers in self.remote:
            rank_found = [False] * len(keys)
            for tier in tiers:
                todo = [i for i, f in enumerate(rank_found) if not f and found[i]]
                if not todo:
                    break
                for i, hit in zip(todo, tier.contains_many([keys[i] for i in todo]), strict=True):
                    rank_found[i] = hit
            found = [a and b for a, b in zip(found, rank_found, strict=True)]
        return found

    def _remember(self, keys: list[ChunkKey], probe: Future[list[bool]]) -> None:
        if probe.exception() is not None:
            return
        now = self._clock()
        with self._seen_lock:
            for key, hit in zip(keys, probe.result(), strict=True):
                self._remote_seen[key] = (hit, now + self._ttl)
            if len(self._remote_seen) > 1 << 16:  # drop the expired ones
                self._remote_seen = {k: v for k, v in self._remote_seen.items() if v[1] >= now}

    def close(self) -> None:
        if self._prober is not None:
            self._prober.shutdown(wait=False, cancel_futures=True)
        for tiers in self.remote:
            for tier in tiers:
                tier.close()
