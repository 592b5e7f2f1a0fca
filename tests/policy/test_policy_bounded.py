"""Soak: every structure of every eviction policy (and of the index and pin set) stays bounded.

A long run of hinted requests from ever new sessions (stores, loads, evictions, deletes, TTL
pins and unpins, answers' ends) must leave every container a policy keeps no larger than a
small multiple of what its tiers hold plus the fixed caps (sessions, ghosts).  The sizes are
read by walking the objects themselves, so a structure added later is covered too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.policy import agent
from kvtier.policy.agent_model import _MAX_SESSIONS
from kvtier.policy.index import PinSet, TierIndex
from kvtier.policy.registry import POLICIES, make_policies
from kvtier.tiers.dram import DramTier

CAPS = 4096 + 128  # the agent model's fixed caps (sessions, ghosts), and a request's own key list


def sizes(*roots: object) -> dict[str, int]:
    """Largest length seen of every container reachable from ``roots``, by where it was found
    (``model.sessions[].keys``).  Walks kvtier objects (``__dict__``, ``__slots__``) and the
    builtin containers inside them; nothing else (numpy buffers, locks, thread pools)."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    todo: list[tuple[str, object]] = [(type(r).__name__, r) for r in roots]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            found[path] = max(found.get(path, 0), len(obj))
            todo.extend((f"{path}[]", v) for v in obj.values())
            todo.extend((f"{path}[k]", k) for k in obj if isinstance(k, tuple))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            found[path] = max(found.get(path, 0), len(obj))
            todo.extend((f"{path}[]", v) for v in obj)
        elif type(obj).__module__.startswith("kvtier"):
            attrs = dict(getattr(obj, "__dict__", {}))
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        attrs[slot] = getattr(obj, slot)
            todo.extend((f"{path}.{name}", v) for name, v in attrs.items())
    return found


def oversized(found: dict[str, int], held: int) -> dict[str, int]:
    """The containers larger than 8 x the chunks held plus the fixed caps."""
    return {path: n for path, n in found.items() if n > 8 * held + CAPS}


@dataclass
class Traffic:
    """Agent-like requests: sessions that grow a context over a few turns, most of them new (so
    the sessions seen keep changing), a few compacting; some share a system prompt."""

    rng: random.Random = field(default_factory=lambda: random.Random(23))
    next_id: int = 0
    live: dict[str, list[ChunkKey]] = field(default_factory=dict)  # session -> its context
    clock: float = 0.0

    def key(self) -> ChunkKey:
        self.next_id += 1
        return ChunkKey(self.next_id.to_bytes(16, "big"))

    def requests(self, num_accesses: int) -> Iterator[tuple[str, list[ChunkKey], float]]:
        prompts = [[self.key() for _ in range(4)] for _ in range(3)]  # shared system prompts
        accesses = 0
        while accesses < num_accesses:
            self.clock += self.rng.expovariate(2.0)
            if not self.live or self.rng.random() < 0.4:  # a new session
                session = f"s{self.next_id}"
                context = list(self.rng.choice(prompts)) if self.rng.random() < 0.5 else []
                self.live[session] = context
                if len(self.live) > 32:  # the oldest live session stops coming
                    del self.live[next(iter(self.live))]
            else:
                session = self.rng.choice(list(self.live))
                context = self.live[session]
                if len(context) > 24 or self.rng.random() < 0.05:  # compacted: a new tail
                    del context[self.rng.randrange(1, len(context) + 1):]
            context.extend(self.key() for _ in range(self.rng.randint(1, 4)))
            accesses += len(context)
            yield session, list(context), self.clock


def run_indexes(name: str, num_accesses: int, capacities: tuple[int, int]) -> tuple[list[TierIndex], PinSet]:
    """Drive two tiers' indexes as an exclusive hierarchy does: hint, read the cached prefix
    (promoting lower hits), store the rest, demote victims, delete and pin some, end answers."""
    traffic = Traffic()
    policies = make_policies(name, 2)
    indexes = [TierIndex(f"g{level + 2}", cap, policy)
               for level, (cap, policy) in enumerate(zip(capacities, policies, strict=True))]
    pins = PinSet(clock=lambda: traffic.clock)
    rng = random.Random(5)

    def evictable(key: ChunkKey) -> bool:
        return key not in pins

    def put(level: int, key: ChunkKey) -> None:
        victims = indexes[level].plan_room(1, evictable, admit=key)
        if victims is None:
            return  # refused (the policy's admission) or all pinned: the chunk is not kept here
        indexes[level].add(key, 1)
        if level == 0:
            for victim in victims:
                put(1, victim)

    for n, (session, keys, now) in enumerate(traffic.requests(num_accesses)):
        indexes[0].policy.observe(keys, session=session, now=now)
        for key in keys:
            if key in indexes[0]:
                indexes[0].touch(key)
            elif key in indexes[1]:  # a lower hit moves up (exclusive tiers)
                indexes[1].discard(key)
                put(0, key)
            else:
                put(0, key)
        if rng.random() < 0.3:
            pinned = keys[:rng.randint(1, 4)]
            pins.pin(pinned, ttl_s=1e6)  # a long TTL: only an unpin ends it
            pins.unpin(pinned)
        if n % 7 == 0:  # a delete (a model update, a corrupt chunk)
            for index in indexes:
                index.discard(rng.choice(keys))
        indexes[0].policy.observe_end(session, awaits=rng.choice(("tool", "user")))
    return indexes, pins


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_structure_of_a_policy_stays_bounded(name: str) -> None:
    indexes, pins = run_indexes(name, 100_000, capacities=(64, 128))
    found = sizes(*indexes, pins)
    assert any(path.endswith("sizes") for path in found)  # the walk reached the indexes
    held = sum(len(index) for index in indexes)
    assert 0 < held <= 64 + 128
    assert oversized(found, 64 + 128) == {}
    if name == "agent":  # far more sessions came than it remembers: it forgot the oldest
        model = indexes[0].policy.model  # type: ignore[attr-defined]
        assert len(model.sessions) == _MAX_SESSIONS
        assert indexes[1].policy.model is model  # type: ignore[attr-defined]


def test_a_ttl_pin_loop_keeps_the_pin_set_small() -> None:
    now = [0.0]
    pins = PinSet(clock=lambda: now[0])
    keys = [ChunkKey(i.to_bytes(16, "big")) for i in range(10)]
    pins.pin(keys[:2])  # a permanent pin and a live TTL pin survive the loop
    pins.pin(keys[2:3], ttl_s=1e9)
    for i in range(100_000):
        now[0] = i * 0.01
        pins.pin(keys[3:], ttl_s=3600)
        pins.unpin(keys[3:])
    assert oversized(sizes(pins), 10) == {}
    assert max(sizes(pins).values()) <= 2 * 3 + 64 + 10
    assert [k in pins for k in keys] == [True] * 3 + [False] * 7
    now[0] = 2e9
    assert [k in pins for k in keys] == [True] * 2 + [False] * 8


LAYOUT = KVLayout(model="test/tiny", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_context_memory_stays_bounded(name: str) -> None:
    """The real wiring: hints, stores, loads, ends, deletes and pins through ``ContextMemory``
    over a 16-chunk DRAM tier."""
    dram = DramTier(LAYOUT, capacity_bytes=16 * LAYOUT.chunk_bytes, prefault=False)
    payload = np.zeros(LAYOUT.chunk_bytes, np.uint8)
    outs = [np.empty(LAYOUT.chunk_bytes, np.uint8) for _ in range(64)]
    rng = random.Random(7)
    with ContextMemory(LAYOUT, [dram], eviction=name) as mem:
        found: dict[str, int] = {}
        for n, (session, keys, now) in enumerate(Traffic().requests(30_000)):
            mem.hint(keys, session=session, now=now)
            loaded = mem.load(keys, outs[:len(keys)])
            mem.store(keys[loaded:], [payload] * (len(keys) - loaded))
            if rng.random() < 0.3:
                mem.pin(keys[:2], ttl_s=1e6)
                mem.unpin(keys[:2])
            if n % 7 == 0:
                mem.delete([rng.choice(keys)])
            mem.hint_end(session, awaits=rng.choice(("tool", "user")))
            if n % 1000 == 0:
                for path, size in sizes(mem).items():
                    found[path] = max(found.get(path, 0), size)
        assert len(mem.indexes[0]) == 16  # the tier is full: evictions ran all along
        found.update({p: max(found.get(p, 0), s) for p, s in sizes(mem).items()})
    assert any(".indexes[].policy" in path for path in found)  # the walk reached the policy
    assert oversized(found, 16) == {}


def test_compacting_the_agent_heaps_changes_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuilt heaps surface the same chunks in the same order: every placement and victim
    of a run is the same as with heaps that are never compacted."""
    decisions: list[tuple[str, ChunkKey | None, tuple[ChunkKey, ...] | None]] = []
    plan_room = TierIndex.plan_room

    def logged(self: TierIndex, size: int, evictable: Callable[[ChunkKey], bool],
               admit: ChunkKey | None = None) -> list[ChunkKey] | None:
        victims = plan_room(self, size, evictable, admit)
        decisions.append((self.name, admit, None if victims is None else tuple(victims)))
        return victims

    monkeypatch.setattr(TierIndex, "plan_room", logged)
    indexes, _ = run_indexes("agent", 30_000, capacities=(8, 16))
    assert len(indexes[1].policy._by_due) <= agent._HEAP_GROWTH * 16 + agent._HEAP_SLACK  # type: ignore[attr-defined]
    compacted, decisions[:] = list(decisions), []
    monkeypatch.setattr(agent, "_HEAP_SLACK", 10**12)  # never compacted
    run_indexes("agent", 30_000, capacities=(8, 16))
    assert len(compacted) > 10_000 and sum(v is not None and len(v) > 0 for _, _, v in compacted) > 5_000
    assert compacted == decisions
