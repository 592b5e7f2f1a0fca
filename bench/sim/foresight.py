"""Foresight references: the agent policy told a part of the future, to see what the bound knows.

The prefix-aware bound (``sim.prefix_bound``) knows when every chunk is used next.  Each reference
here gives the agent policy (``kvtier/policy/agent.py``, its heaps, admission and ghosts
unchanged) one more part of that knowledge, at each use of a chunk::

    deaths    whether this use is the chunk's last: then it is due never (evicted first, refused)
    classes   + whether its next use comes within ``split_s`` or later: due = now + the mean
              next-use gap of that class over the whole trace (a tool loop or a human, say)
    next-use  + the exact time of its next use (the idle rule off): MIN's knowledge in the
              agent's machinery, so it should come close to the bound

None of them is an online policy.  They place the bound's lead: if ``classes`` is far below the
bound, the lead is in *when* each chunk returns within its class, which nothing online sees.
``kvtier bench tight --foresight deaths,classes,next-use`` adds them to its tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from bench.sim.sim import Workload
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.policy.agent import AgentModel, AgentPolicy
from kvtier.policy.agent_state import _DEAD
from kvtier.policy.eviction import EvictionPolicy
from kvtier.policy.retention import Retention

TELLS = ("deaths", "classes", "next-use")


class ForesightModel(AgentModel):
    """An ``AgentModel`` that knows each chunk's next use in ``work`` (the simulator replays it)."""

    def __init__(self, work: Workload, tell: str, *, split_s: float = 10.0) -> None:
        _check(tell, split_s)
        super().__init__()
        self.tell, self.split_s = tell, split_s
        times = [r.time_s for r in work.requests]
        self._next_s: list[list[float]] = []  # per request, per chunk: the time of its next use (inf: never)
        last: dict[int, float] = {}
        for i in range(len(work.keys) - 1, -1, -1):
            at: list[float] = []
            for k in work.keys[i]:
                at.append(last.get(k, math.inf))
                last[k] = times[i]
            self._next_s.append(at)
        self._next_s.reverse()
        gaps = [(nxt - times[i]) for i, at in enumerate(self._next_s) for nxt in at if nxt < math.inf]
        short = [g for g in gaps if g < split_s]
        long = [g for g in gaps if g >= split_s]
        self.short_s = sum(short) / len(short) if short else split_s
        self.long_s = sum(long) / len(long) if long else split_s
        self._request = -1
        self._next: dict[ChunkKey, float] = {}

    def observe(self, keys: Sequence[ChunkKey], *, session: str | None = None, now: float | None = None,
                retention: Retention | None = None) -> None:
        self._request += 1
        nexts = self._next_s[self._request] if self._request < len(self._next_s) else []
        if len(nexts) != len(keys):
            raise ConfigError(f"foresight: request {self._request} has {len(keys)} chunks, the workload "
                              f"{len(nexts)}; replay the workload it was built for, in order")
        self._next = dict(zip(keys, nexts, strict=True))
        super().observe(keys, session=session, now=now, retention=retention)

    def observe_end(self, session: str, awaits: str) -> None:
        if self.tell == "deaths":  # the agent's own guess for the living: the end hints too
            super().observe_end(session, awaits)
        # told when (or its class): what an answer waits for says nothing more

    def predict(self, key: ChunkKey) -> tuple[float, int]:
        due, depth = super().predict(key)
        nxt = self._next.get(key)
        node = self.nodes.get(key) or self.ghosts.get(key)
        if nxt is None or (node is not None and node.stamp == self.stamp):
            return due, depth  # not a use by this request (a move between tiers), or used by it already
        if nxt == math.inf:
            return _DEAD, depth
        if self.tell == "deaths":
            return due, depth
        if self.tell == "classes":
            return self.now + (self.short_s if nxt - self.now < self.split_s else self.long_s), depth
        return nxt, depth


def family(work: Workload, tell: str, *, split_s: float = 10.0) -> Callable[[int], list[EvictionPolicy]]:
    """``simulate(family=...)``: each run's tiers get agent policies sharing one fresh model."""
    _check(tell, split_s)

    def build(n: int) -> list[EvictionPolicy]:
        model = ForesightModel(work, tell, split_s=split_s)
        policies: list[EvictionPolicy] = []
        for _ in range(n):
            policy = AgentPolicy(model)
            policy.idle = 0.0 if tell == "next-use" else policy.idle  # told when: idle time says nothing
            policies.append(policy)
        return policies

    return build


def _check(tell: str, split_s: float) -> None:
    if tell not in TELLS:
        raise ConfigError(f"unknown foresight {tell!r}; known: {', '.join(TELLS)}")
    if not split_s > 0:
        raise ConfigError(f"foresight split_s must be > 0, got {split_s}")
