"""Simulate mode: replay a request stream through the real ``ContextMemory`` with no payloads.

For each request, in arrival order, the simulator does what an engine with kvtier does::

    keys = chunk keys of the request's full chunks         (chained block keys, see stream.py)
    n    = memory.load(keys, ...)     # longest cached prefix; lower-tier hits are promoted
    memory.store(keys[n:], ...)       # the recomputed chunks go into the top tier
    memory.flush()                    # write-through to persistent tiers, kept deterministic

over ``NullTier`` tiers (``kvtier/tiers/null.py``): the hierarchy's own index, eviction policy,
demotion and promotion code runs unchanged, only the bytes are missing (one shared dummy array
stands in for every payload).  Hits per tier, recomputed tokens and bytes per tier come from
that run; the cost model turns them into a TTFT.

``prefetch_share > 0`` runs the hierarchy's prefetch during tool pauses (``kvtier.prefetch``):
when an answer that awaits a tool ends, the session's chunks below DRAM are promoted, at most as
many as ``prefetch_Bps`` reads before the session's next call (one prefetch at a time on the
drive: concurrent pauses do not share its bandwidth here, so this is an upper bound), and the
replay waits for it (deterministic).  With ``replicas > 0`` requests also queue
for ``replicas`` GPUs (first free), so TTFT includes waiting when the GPUs are saturated.

Two references use the same chunk access sequence and cost model, without the hierarchy:
``ideal`` (an infinite cache: every chunk seen before is a hit) and ``belady`` (Belady's MIN at
a given capacity: evict the chunk whose next use is furthest, bypass one never used again).
MIN counts chunk hits and may bypass a parent while keeping its child, so its prefix hits are no
bound (lru-prefix beat it on the kv-cache-tester traces).  ``prefix_bound`` is: MIN kept
prefix-closed, over the total capacity of all tiers; no online policy may beat it.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bench.sim.costmodel import CostModel
from bench.sim.workloads.stream import Request, block_keys
from kvtier.errors import ConfigError
from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.policy.eviction import EvictionPolicy
from kvtier.tiers.null import NullTier

Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass(frozen=True, slots=True)
class Workload:
    """A request stream cut into chunks: the input of every run."""

    requests: tuple[Request, ...]
    chunk_tokens: int
    keys: tuple[tuple[int, ...], ...]  # full-chunk keys of each request (64-bit chained ints)

    @property
    def unique_chunks(self) -> int:
        return len({k for ks in self.keys for k in ks})

    @property
    def total_chunk_accesses(self) -> int:
        return sum(len(ks) for ks in self.keys)


def prepare(requests: Sequence[Request], *, chunk_blocks: int = 1) -> Workload:
    """Chunk keys for every request; a chunk is ``chunk_blocks`` blocks of the largest block size.

    A chunk's key is the chained key of its last block (so it names the whole prefix).  Mixed
    block sizes are fine as long as they divide the chunk size.
    """
    if not requests:
        raise ConfigError("empty request stream: nothing to replay")
    if chunk_blocks < 1:
        raise ConfigError(f"chunk_blocks must be >= 1, got {chunk_blocks}")
    chunk_tokens = math.lcm(*{r.block_tokens for r in requests}) * chunk_blocks
    keys = []
    for r in requests:
        per = chunk_tokens // r.block_tokens
        n_full = min(len(r.hash_ids), r.input_tokens // r.block_tokens) // per
        bk = block_keys(replace(r, hash_ids=r.hash_ids[:n_full * per]))
        keys.append(tuple(bk[per - 1::per]))
    return Workload(tuple(requests), chunk_tokens, tuple(keys))


@dataclass(frozen=True, kw_only=True)
class TierSpec:
    name: str  # "hbm", "dram", "disk" or "remote": also picks the cost model's link
    capacity_bytes: int
    persistent: bool = False  # a write-through target (disk, remote)


@dataclass
class RunResult:
    """Per-request outcome of one run (arrays aligned with the workload's requests)."""

    label: str
    policy: str  # "lru", "s3fifo", ..., or "ideal" / "belady"
    tiers: tuple[TierSpec, ...]
    context_tokens: np.ndarray  # (R,) input tokens
    hit_tokens: np.ndarray  # (R, T) tokens served from each tier
    ttft_s: np.ndarray  # (R,) loads + prefill (no queueing)
    queued_ttft_s: np.ndarray | None = None  # (R,) with waiting for a GPU, when replicas > 0
    tier_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> read/written...
    prefetch: dict[str, int] = field(default_factory=dict)  # PrefetchStats, when prefetch ran
    wall_s: float = 0.0

    @property
    def hit_total(self) -> np.ndarray:
        return np.asarray(self.hit_tokens.sum(axis=1))


def _tiers_for(specs: Sequence[TierSpec], layout: KVLayout, dummy: np.ndarray, *,
               dram_slots: bool = False) -> list[NullTier]:
    return [NullTier.named(s.name, persistent=s.persistent, slots=dram_slots and s.name == "dram")(
        layout, capacity_bytes=s.capacity_bytes, dummy=dummy) for s in specs]


def simulate(work: Workload, cost: CostModel, specs: Sequence[TierSpec], *, policy: str = "lru",
             promotion: str = "always", write_through: bool = True, exclusive: bool = False,
             write_through_share: float = 0.0, replicas: int = 0, progress: Progress | None = None,
             label: str = "", family: Callable[[int], Sequence[EvictionPolicy]] | None = None,
             prefetch_share: float = 0.0, prefetch_Bps: float = float("inf"), dram_slots: bool = False) -> RunResult:
    """Replay ``work`` through a ContextMemory over payload-free tiers (each request hinted with
    its session and trace time, ``ContextMemory.hint``).  ``family(n)`` builds the ``n`` tiers'
    policies in place of ``policy``'s (a reference such as ``bench.foresight``).
    ``prefetch_share``, ``prefetch_Bps``: prefetch during tool pauses (module docstring), which needs
    ``dram_slots``: the DRAM tier takes chunks through slots, as the real one (the in-place path)."""
    layout = replace(cost.shape.layout, tokens_per_chunk=work.chunk_tokens)
    dummy = np.zeros(layout.chunk_bytes, dtype=np.uint8)
    memory = ContextMemory(layout, _tiers_for(specs, layout, dummy, dram_slots=dram_slots), eviction=policy,
                           promotion=promotion, write_through=write_through, exclusive=exclusive,
                           write_through_share=write_through_share,
                           policies=family(len(specs)) if family else None, prefetch_share=prefetch_share)
    n_req, n_tiers = len(work.requests), len(specs)
    hits = np.zeros((n_req, n_tiers), dtype=np.int64)
    tiers = memory.tiers
    collecting = gc.isenabled()
    gc.disable()  # the replay allocates millions of small objects but makes no cycles: collections only cost time
    started = time.perf_counter()
    requests = [[ChunkKey(k.to_bytes(16, "little")) for k in ks] for ks in work.keys]  # chunk keys are 16 bytes
    ends: list[tuple[float, int]] = []  # (when an answer ends, its request): told to the policy then
    latest: dict[str, int] = {}  # session -> its latest request
    pauses = _Pauses(memory, work.requests, requests, prefetch_Bps)
    try:
        for i, keys in enumerate(requests):
            request = work.requests[i]
            while ends and ends[0][0] <= request.time_s:
                _tell_end(memory, work.requests, heapq.heappop(ends)[1], latest, pauses)
            latest[request.session] = i
            memory.hint(keys, session=request.session, now=request.time_s)
            before = [t.stats.hits for t in tiers]
            n = memory.load(keys, [dummy] * len(keys)) if keys else 0
            if n < len(keys):
                memory.store(keys[n:], [dummy] * (len(keys) - n))
                memory.flush()
            if request.awaits is not None and request.answer_s:  # its answer's end: told when it comes
                heapq.heappush(ends, (request.time_s + request.answer_s, i))
            elif request.awaits is not None:  # no answer time known: at once
                _tell_end(memory, work.requests, i, latest, pauses)
            for level, tier in enumerate(tiers):
                hits[i, level] = tier.stats.hits - before[level]
            if progress and i % 256 == 255:
                progress(256)
        if progress:
            progress(n_req % 256)
        tier_bytes = {t.name: {"bytes_read": t.stats.bytes_read, "bytes_written": t.stats.bytes_written,
                               "evictions": t.stats.evictions, "demotions": t.stats.demotions,
                               "promotions": t.stats.promotions} for t in tiers}
        prefetched = memory.prefetch.stats.as_dict() if memory.prefetch.enabled else {}
    finally:
        memory.close()
        if collecting:
            gc.enable()
    wall = time.perf_counter() - started
    run = _finish(work, cost, specs, hits * work.chunk_tokens, policy, label or policy, replicas, tier_bytes, wall)
    run.prefetch = prefetched
    return run


class _Pauses:
    """What a prefetch may read in a tool pause: the chunks below DRAM that ``bandwidth_Bps`` reads
    between the answer's end and the session's next call (the session's last keys, cut there)."""

    def __init__(self, memory: ContextMemory, requests: Sequence[Request], keys: Sequence[Sequence[ChunkKey]],
                 bandwidth_Bps: float) -> None:
        self.memory, self.requests, self.keys, self.bandwidth_Bps = memory, requests, keys, bandwidth_Bps
        self.next_call: list[float | None] = [None] * len(requests)
        later: dict[str, float] = {}
        for i in range(len(requests) - 1, -1, -1):
            self.next_call[i] = later.get(requests[i].session)
            later[requests[i].session] = requests[i].time_s

    def limit(self, i: int) -> None:
        """Before request ``i``'s answer is told to end awaiting a tool: cut what its prefetch reads."""
        if not self.memory.prefetch.enabled or math.isinf(self.bandwidth_Bps):
            return
        request, nxt = self.requests[i], self.next_call[i]
        if nxt is None:
            return
        pause = max(nxt - request.time_s - (request.answer_s or 0.0), 0.0)
        budget = max(int(pause * self.bandwidth_Bps // self.memory.chunk_bytes), 1)
        keys = self.keys[i]
        below, cut = 0, len(keys)
        for j, level in enumerate(self.memory.lookup(keys).tiers):
            below += level > 0
            if below > budget:
                cut = j
                break
        self.memory.prefetch.note(request.session, keys[:max(cut, 1)])


def _tell_end(memory: ContextMemory, requests: Sequence[Request], i: int, latest: dict[str, int],
              pauses: _Pauses | None = None) -> None:
    """Tell the policy what request ``i``'s answer waits for, unless its session called again since
    (the trace's next call came before the answer's recorded end: the hint is stale).  A tool's
    pause prefetches (``pauses`` cuts it to what the drive reads in the pause); the replay waits."""
    request = requests[i]
    if latest.get(request.session) == i and request.awaits is not None:
        if pauses is not None and request.awaits == "tool":
            pauses.limit(i)
        memory.hint_end(request.session, awaits=request.awaits)
        if memory.prefetch.enabled:
            memory.prefetch.drain()


def ideal(work: Workload, cost: CostModel, *, replicas: int = 0) -> RunResult:
    """An infinite cache: the longest prefix of chunks seen before is a hit (served from DRAM)."""
    started = time.perf_counter()
    seen: set[int] = set()
    hits = np.zeros((len(work.requests), 1), dtype=np.int64)
    for i, ks in enumerate(work.keys):
        n = 0
        while n < len(ks) and ks[n] in seen:
            n += 1
        seen.update(ks)
        hits[i, 0] = n
    spec = (TierSpec(name="dram", capacity_bytes=len(seen) * _chunk_bytes(work, cost)),)
    return _finish(work, cost, spec, hits * work.chunk_tokens, "ideal", "ideal", replicas, {},
                   time.perf_counter() - started)


def _next_uses(work: Workload) -> tuple[list[int], int]:
    """For each position of the flattened chunk access sequence, the position of that chunk's next
    access, and the value meaning "never again" (the sequence's length)."""
    flat = [k for ks in work.keys for k in ks]
    never = len(flat)
    next_use = [never] * len(flat)
    last: dict[int, int] = {}
    for pos in range(len(flat) - 1, -1, -1):
        next_use[pos] = last.get(flat[pos], never)
        last[flat[pos]] = pos
    return next_use, never


def belady(work: Workload, cost: CostModel, capacity_bytes: int, *, replicas: int = 0, label: str = "") -> RunResult:
    """Belady's MIN over the chunk access sequence, ``capacity_bytes`` of cache (served from DRAM)."""
    started = time.perf_counter()
    slots = capacity_bytes // _chunk_bytes(work, cost)
    next_use, never = _next_uses(work)
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped lazily
    hits = np.zeros((len(work.requests), 1), dtype=np.int64)
    pos = 0
    for i, ks in enumerate(work.keys):
        prefix, in_prefix = 0, True
        for key in ks:
            nxt = next_use[pos]
            pos += 1
            if key in cache:
                prefix += in_prefix
            else:
                in_prefix = False
                if nxt == never or slots == 0:
                    continue
                if len(cache) >= slots:
                    while -heap[0][0] != cache.get(heap[0][1]):
                        heapq.heappop(heap)
                    if -heap[0][0] <= nxt:  # everything cached is needed sooner: bypass
                        continue
                    del cache[heapq.heappop(heap)[1]]
            if nxt == never:
                del cache[key]
            else:
                cache[key] = nxt
                heapq.heappush(heap, (-nxt, key))
        hits[i, 0] = prefix
    spec = (TierSpec(name="dram", capacity_bytes=capacity_bytes),)
    return _finish(work, cost, spec, hits * work.chunk_tokens, "belady", label or "belady", replicas, {},
                   time.perf_counter() - started)


def prefix_bound(work: Workload, cost: CostModel, capacity_bytes: int, *, replicas: int = 0,
                 label: str = "") -> RunResult:
    """The prefix-aware offline bound: MIN that keeps its cache prefix-closed, and counts prefix hits.

    ``capacity_bytes`` is the total of every tier (a chunk held twice counts twice).  Rules:

    * a request's hit is its longest prefix of cached chunks (what an engine can use);
    * a chunk is useful only while its parent is cached: past the hit, a cached chunk's access in
      this request serves nothing, so every chunk of the request is first given its next use
      *after* the request;
    * then the recomputed chunks are admitted root first: the victim is the chunk whose next use
      is furthest, or the chunk itself (then it and its descendants are bypassed).  A parent is
      always used before its child, so a victim is never a cached chunk's parent.

    So the cache stays prefix-closed and every chunk hit is a prefix hit.  Plain ``belady`` sees
    the useless in-request access of a child as a use: it bypasses the parent, keeps the child,
    and gets a chunk hit but no prefix hit; it is no bound for prefix hits (lru-prefix beat it).
    ``tests/bench/test_bound.py`` checks on random workloads that no online policy at the same
    total capacity beats this one, and that it is never below MIN's prefix hits.
    """
    started = time.perf_counter()
    slots = capacity_bytes // _chunk_bytes(work, cost)
    next_use, never = _next_uses(work)
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped lazily
    hits = np.zeros((len(work.requests), 1), dtype=np.int64)
    pos = 0
    for i, ks in enumerate(work.keys):
        base, prefix = pos, 0
        while prefix < len(ks) and ks[prefix] in cache:  # the hit
            prefix += 1
        # Every access of this request is known now: the recomputed tail's cached chunks are
        # needed next after this request, not at their (useless, non-prefix) access in it.
        for j, key in enumerate(ks):
            nxt = next_use[base + j]
            if key in cache:
                if nxt == never:
                    del cache[key]
                else:
                    cache[key] = nxt
                    heapq.heappush(heap, (-nxt, key))
        pos += len(ks)
        for j in range(prefix, len(ks)):  # admit the recomputed chunks, root first
            key, nxt = ks[j], next_use[base + j]
            if key in cache:
                continue
            if nxt == never or slots == 0:
                break  # its descendants are never used again either
            if len(cache) >= slots:
                while -heap[0][0] != cache.get(heap[0][1]):
                    heapq.heappop(heap)
                if -heap[0][0] <= nxt:  # everything cached is needed sooner: bypass it and its descendants
                    break
                del cache[heapq.heappop(heap)[1]]
            cache[key] = nxt
            heapq.heappush(heap, (-nxt, key))
        hits[i, 0] = prefix
    spec = (TierSpec(name="dram", capacity_bytes=capacity_bytes),)
    return _finish(work, cost, spec, hits * work.chunk_tokens, "bound", label or "prefix bound", replicas, {},
                   time.perf_counter() - started)


def _chunk_bytes(work: Workload, cost: CostModel) -> int:
    return cost.shape.layout.bytes_per_token * work.chunk_tokens


def _finish(work: Workload, cost: CostModel, specs: Sequence[TierSpec], hit_tokens: np.ndarray, policy: str,
            label: str, replicas: int, tier_bytes: dict[str, dict[str, int]], wall: float) -> RunResult:
    context = np.array([r.input_tokens for r in work.requests], dtype=np.int64)
    hit_tokens = np.minimum(hit_tokens, context[:, None])
    ttft = request_ttfts(work, cost, [s.name for s in specs], hit_tokens)
    queued = _queue(work, ttft, replicas) if replicas > 0 else None
    return RunResult(label=label, policy=policy, tiers=tuple(specs), context_tokens=context, hit_tokens=hit_tokens,
                     ttft_s=ttft, queued_ttft_s=queued, tier_bytes=tier_bytes, wall_s=wall)


def request_ttfts(work: Workload, cost: CostModel, tier_names: Sequence[str], hit_tokens: np.ndarray) -> np.ndarray:
    """Each request's TTFT (no queueing) for its hit tokens per tier, under ``cost``'s decision."""
    context = np.array([r.input_tokens for r in work.requests], dtype=np.int64)
    planner = cost.planner(tier_names)
    chunks = hit_tokens // work.chunk_tokens
    ttft = np.empty(len(context))
    for i in range(len(context)):  # the engine's fetch-or-recompute decision, top tier read first
        ttft[i] = cost.request_ttft_s(planner, chunks[i].tolist(), context=int(context[i]),
                                      tokens_per_chunk=work.chunk_tokens)
    return ttft


def _queue(work: Workload, service_s: np.ndarray, replicas: int) -> np.ndarray:
    """TTFT with FIFO waiting for the first free of ``replicas`` GPUs (prefill occupies one)."""
    free = [0.0] * replicas
    out = np.empty(len(service_s))
    for i, r in enumerate(work.requests):
        start = max(r.time_s, heapq.heappop(free))
        heapq.heappush(free, start + float(service_s[i]))
        out[i] = start - r.time_s + float(service_s[i])
    return out
