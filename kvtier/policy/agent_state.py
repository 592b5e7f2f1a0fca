"""The agent policy's state (``kvtier.policy.agent``): sessions, hinted requests, per-chunk predictions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.keys import ChunkKey
from kvtier.policy.retention import Retention

_DEAD = math.inf
_MAX_REQUESTS = 256  # hinted requests whose chunks may still be stored (an engine's batch, chunked prefill)
# a heap of the policy or the model is rebuilt past this many stale entries beyond its bound (amortised O(1) per use)
_HEAP_SLACK = 64


@dataclass(slots=True)
class _Session:
    last_t: float
    gap: float | None  # EWMA of inter-arrival gaps; None until the second call
    keys: Sequence[ChunkKey]  # the last request's keys (compaction detection)
    awaits: str | None = None  # its last response's end (``AgentModel.observe_end``); None: not told
    end_t: float = 0.0  # when that end was told
    class_gap: dict[str, float] = field(default_factory=dict)  # EWMA of the gaps after each kind of end


@dataclass(slots=True)
class _Request:
    """A hinted request (``AgentModel.observe``): its chunks stored later are uses by it."""

    stamp: int
    session_id: str | None
    session: _Session | None
    depth: dict[ChunkKey, int]  # its chunks' positions
    retention: Retention | None
    floor: float = -math.inf  # due of the deepest chunk touched so far (a child is not due before its parent)
    floor_depth: int = -1


@dataclass(slots=True)
class _Node:
    last_t: float  # last use
    alive: float  # last sign of its session's life: its last use, or the end of the answer to that use
    due: float  # predicted next use
    depth: int  # chunk position in the request that last used it (deeper = evicted first on ties)
    gap: float | None  # EWMA of this chunk's own inter-use gaps
    owner: str | None  # session that last used it
    stamp: int  # request that last updated it (one update per request)
    tiers: int = 0  # tier policies holding it
    own: float = _DEAD  # the next use its last session predicted for itself (``due`` may be another's, sooner)
    priority: int = 0  # asked by the last request that named one (``Retention``)
    keep_until: float = -math.inf  # kept at least until then (a request's ``ttl_s``)
    rank: int = 0  # eviction rank: lowest first (``kvtier.policy.retention.rank``)
