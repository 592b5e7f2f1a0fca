"""What the scheduler side of the vLLM connector tells the worker each step: jobs, in a ``StepPlan``.

Plain data, made by ``vllm_plan.Planner`` in the EngineCore process and carried to the worker
process in the connector metadata; ``vllm_worker`` runs them (hints and ends before loads, then
loads, pins and, after the forward, saves).  Block ids are vLLM's, ``blocks_per_chunk`` per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.keys import ChunkKey
from kvtier.policy.retention import Retention


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

