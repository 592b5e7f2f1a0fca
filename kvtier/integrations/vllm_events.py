"""Tier-annotated KV events: what kvtier holds, in vLLM's KV-events format, for KV-aware routers.

vLLM publishes its own GPU prefix cache as ``BlockStored``/``BlockRemoved`` events (medium "GPU")
when ``KVEventsConfig(enable_kv_cache_events=True)``; the scheduler also publishes whatever the
connector's ``take_events`` returns, in the same batches.  ``KVEvents`` (scheduler side) turns
kvtier's chunks into such events, so a router (Dynamo, llm-d, the SGLang router) sees a prefix
kvtier holds in DRAM, on disk or in a shared tier as cached on this engine:

* **one residency per medium**, as vLLM's own ``OffloadingConnector`` reports its tiers: a chunk
  that enters a tier is ``BlockStored`` with that tier's medium, one that leaves it is
  ``BlockRemoved`` with that medium.  DRAM -> disk (a demotion) is ``BlockRemoved`` CPU then
  ``BlockStored`` STORAGE: a consumer that keys on (hash, medium) keeps the block on this engine,
  and one that ignores the medium sees the removal before the store, so it keeps it too.  The
  last medium's ``BlockRemoved`` means the chunk left this engine.  Mediums: ``vllm_compat.event_kinds``
  (dram CPU, disk STORAGE, Redis/Mooncake STORAGE with ``locality`` "REMOTE"; 0.26: FS and OBJ).
  With tensor parallelism a chunk is in a tier when every rank holds it (``ChunkDirectory``).
* **vLLM's block hashes**: a chunk of ``chunk_tokens`` covers ``chunk_tokens / block_size`` of
  vLLM's blocks; both are hashes of the same tokens (and LoRA, multimodal inputs, cache salt:
  ``vllm_keys``), so the chunk's events carry ``Request.block_hashes`` of those blocks (and their
  tokens, parent hash and extra keys, as vLLM's block pool publishes them).  The mapping is taken
  from a live request: when a save or a load is planned, and when a request is first scheduled
  with chunks the worker holds (another request saved them, or they were on disk at start-up).  A
  chunk no request has named yet is not announced.
* **bounded**: at most ``max_chunks`` chunks are mapped (least recently named first out: a mapped
  chunk that is announced is ``BlockRemoved`` when it is dropped, counted ``kv_events_forgotten``,
  so a router never keeps a chunk kvtier can no longer report), at most ``max_events`` events wait
  for ``take_events`` (more are dropped, counted ``kv_events_dropped``).  An error in here is
  logged (at most once a minute) and counted (``kv_events_errors``), never raised into the engine.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvtier.integrations.vllm_compat import EventKinds
from kvtier.integrations.vllm_config import ConnectorOptions
from kvtier.integrations.vllm_counters import ConnectorCounters
from kvtier.integrations.vllm_directory import ChunkDirectory
from kvtier.integrations.vllm_jobs import LoadJob, SaveJob, StepPlan
from kvtier.integrations.vllm_plan import Planner
from kvtier.keys import ChunkKey

logger = logging.getLogger("vllm.kvtier")

_ERROR_LOG_S = 60.0
Medium = tuple[str, str]  # (medium, locality)


@dataclass(slots=True)
class ChunkBlocks:
    """One chunk as vLLM's blocks: what its ``BlockStored`` events carry."""

    hashes: tuple[bytes, ...]  # Request.block_hashes of the chunk's blocks
    parent: bytes | None  # the hash of the block before the chunk (None: the chunk starts the prompt)
    tokens: array[int]
    lora_id: int | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    announced: set[Medium] = field(default_factory=set)  # stored, not removed since


def chunk_blocks(request: Any, index: int, tokens_per_chunk: int, block_size: int,
                 extra_keys: Callable[[Any, int, int, int], list[Any] | None] | None = None) -> ChunkBlocks | None:
    """Chunk ``index`` of ``request`` as vLLM's blocks; None when vLLM has not hashed them all yet."""
    per = tokens_per_chunk // block_size
    first = index * per
    hashes = request.block_hashes[first:first + per]
    if len(hashes) < per:
        return None
    lora = request.lora_request
    extras = None
    if extra_keys is not None and (lora is not None or request.mm_features or request.cache_salt
                                   or getattr(request, "prompt_embeds", None) is not None):
        extras = extra_keys(request, first, per, block_size)
    return ChunkBlocks(tuple(hashes), request.block_hashes[first - 1] if first else None,
                       array("i", request.all_token_ids[index * tokens_per_chunk:(index + 1) * tokens_per_chunk]),
                       getattr(lora, "adapter_id", getattr(lora, "lora_int_id", None)) if lora else None,
                       getattr(lora, "name", getattr(lora, "lora_name", None)) if lora else None, extras)


class KVEvents:
    """Scheduler side: kvtier's chunks as vLLM KV events (module docstring).  Fed by the connector:
    ``planned`` (each step's plan), ``changed`` (the worker's report), drained by ``take`` (vLLM's
    ``take_events``)."""

    def __init__(self, kinds: EventKinds, planner: Planner, *, block_size: int, max_chunks: int = 1 << 15,
                 max_events: int = 100_000,
                 extra_keys: Callable[[Any, int, int, int], list[Any] | None] | None = None) -> None:
        self.kinds = kinds
        self.planner = planner
        self.directory: ChunkDirectory = planner.directory
        self.block_size = block_size
        self.max_chunks = max_chunks
        self.max_events = max_events
        self.extra_keys = extra_keys
        self.chunks: OrderedDict[ChunkKey, ChunkBlocks] = OrderedDict()  # least recently named first
        self.counters = ConnectorCounters()  # since the last take_counters
        self._events: list[Any] = []
        self._error_logged = -_ERROR_LOG_S

    # --- what the connector tells -------------------------------------------------------------
    def planned(self, plan: StepPlan, new_requests: Iterable[Any] = ()) -> None:
        """A step is planned: map the chunks of its saves and loads (a chunk loaded from a shared disk
        or G4 enters this worker's index), and the leading chunks the worker holds of each request
        scheduled for the first time (``scheduled_new_reqs``) that no request named yet."""
        with self._guard():
            for new in new_requests:
                self._held_prefix(new.req_id)
            jobs: list[SaveJob | LoadJob] = [*plan.saves, *plan.loads]
            for job in jobs:
                state = self.planner.requests.get(job.req_id)
                if state is None or state.keys is None:
                    continue
                wanted = set(job.keys)
                request = state.request
                for i, key in enumerate(state.keys(request.num_tokens)):
                    if key in wanted:
                        self._map(key, request, i)

    def changed(self, changes: Iterable[tuple[int, str, ChunkKey, bool]]) -> None:
        """The worker's report, after the directory applied it: events for the mapped chunks."""
        with self._guard():
            for key in dict.fromkeys(change[2] for change in changes):  # in report order
                self._sync(key)

    def take(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def take_counters(self) -> ConnectorCounters:
        counters, self.counters = self.counters, ConnectorCounters()
        return counters

    # --- inside ---------------------------------------------------------------------------------
    def _held_prefix(self, req_id: str) -> None:
        state = self.planner.requests.get(req_id)
        if state is None or state.keys is None:
            return
        held, request = self.directory.held, state.request
        for i, key in enumerate(state.keys(request.num_tokens)):
            if key not in held:
                break
            if key not in self.chunks:
                self._map(key, request, i)

    def _map(self, key: ChunkKey, request: Any, index: int) -> None:
        blocks = self.chunks.get(key)
        if blocks is None:
            blocks = chunk_blocks(request, index, self.planner.chunk, self.block_size, self.extra_keys)
            if blocks is None:
                return
            self.chunks[key] = blocks
            while len(self.chunks) > self.max_chunks:
                _, old = self.chunks.popitem(last=False)
                if old.announced:
                    self.counters.add(kv_events_forgotten=1)
                    for medium in sorted(old.announced):
                        self._emit(self._removed(old, medium), removed=True)
        else:
            self.chunks.move_to_end(key)
        self._sync(key)

    def _sync(self, key: ChunkKey) -> None:
        blocks = self.chunks.get(key)
        if blocks is None:
            return
        now = self._media(key)
        for medium in sorted(blocks.announced - now):  # removals first (module docstring)
            blocks.announced.discard(medium)
            self._emit(self._removed(blocks, medium), removed=True)
        for medium in sorted(now - blocks.announced):
            blocks.announced.add(medium)
            self._emit(self._stored(blocks, medium), removed=False)

    def _media(self, key: ChunkKey) -> set[Medium]:
        """The mediums of the tiers every rank holds ``key`` in."""
        where = self.directory.held.get(key)
        if not where:
            return set()
        media = self.kinds.media
        return {media.get(tier, self.kinds.remote) for tier, mask in where.items()
                if mask == self.directory.full and tier != "null"}

    def _stored(self, b: ChunkBlocks, medium: Medium) -> Any:
        convert = self.kinds.external_hash
        return self.kinds.stored(
            block_hashes=[convert(h) for h in b.hashes],
            parent_block_hash=None if b.parent is None else convert(b.parent),
            token_ids=b.tokens.tolist(), block_size=self.block_size, lora_id=b.lora_id, medium=medium[0],
            lora_name=b.lora_name, extra_keys=b.extra_keys, locality=medium[1])

    def _removed(self, b: ChunkBlocks, medium: Medium) -> Any:
        convert = self.kinds.external_hash
        return self.kinds.removed(block_hashes=[convert(h) for h in b.hashes], medium=medium[0], locality=medium[1])

    def _emit(self, event: Any, *, removed: bool) -> None:
        if len(self._events) >= self.max_events:
            self.counters.add(kv_events_dropped=1)
            return
        self._events.append(event)
        self.counters.add(**{"kv_events_removed" if removed else "kv_events_stored": 1})

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # events are advice to a router: never stop the engine for them
            self.counters.add(kv_events_errors=1)
            now = time.monotonic()
            if now - self._error_logged >= _ERROR_LOG_S:
                self._error_logged = now
                logger.warning("kvtier: KV events failed (the engine goes on): %s: %s", type(exc).__name__, exc)


class NoEvents:
    """KV events off (vLLM's are off, ``kv_events`` is false, or the release has no hook): no-ops."""

    def planned(self, plan: StepPlan, new_requests: Iterable[Any] = ()) -> None:
        return

    def changed(self, changes: Iterable[tuple[int, str, ChunkKey, bool]]) -> None:
        return

    def take(self) -> list[Any]:
        return []

    def take_counters(self) -> ConnectorCounters:
        return ConnectorCounters()


def open_events(vllm_config: Any, options: ConnectorOptions, planner: Planner | None,
                block_size: int) -> KVEvents | NoEvents:
    """The scheduler's ``KVEvents`` when vLLM publishes KV events (``kv_events_config``) and the
    connector's ``kv_events`` option is on; else ``NoEvents`` (a one-line log says why, where it matters)."""
    from kvtier.integrations import vllm_compat

    config = getattr(vllm_config, "kv_events_config", None)
    if planner is None or config is None or not getattr(config, "enable_kv_cache_events", False):
        return NoEvents()
    if not options.kv_events:
        logger.info("kvtier: KV events off (kv_events = false): routers see vLLM's GPU blocks only")
        return NoEvents()
    kinds = vllm_compat.event_kinds()
    if kinds is None:
        logger.info("kvtier: this vLLM has no connector KV-event hook: kvtier publishes no KV events")
        return NoEvents()
    logger.info("kvtier: KV events on: chunks in %s", ", ".join(
        f"{t}={'/'.join(kinds.media.get(t, kinds.remote))}" for t in planner.directory.tiers))
    return KVEvents(kinds, planner, block_size=block_size, max_chunks=options.kv_events_max_chunks,
                    extra_keys=vllm_compat.event_extra_keys)
