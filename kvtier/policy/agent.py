"""The agent-aware policy: evict the chunk whose next use is predicted furthest away.

Agentic traffic says when a chunk comes back: a session's next call usually follows seconds later (a tool loop),
sometimes minutes (a human); a shared prefix (system prompt, tools, a parent's context under sub-agents) comes back
with whichever of its sessions calls first; a session that compacted its context never reads its old tail again. So
every chunk carries a **predicted next use** ``due`` and the victim is the chunk due last (among equals the deepest
chunk of its prefix, so a context shrinks from its tail and keeps a usable prefix)::

    used at t by session s:   due = min(t + gap, due if still ahead)   # shared: the first caller
    gap  = the chunk's own inter-use gap (EWMA) if it was used before, else the session's
           inter-arrival gap (EWMA) if the session called before, else the gap new sessions
           took to call a second time (``first_gap``, EWMA over sessions), else "not expected back";
           a request with no session: the gap chunks came back after so far (``reuse_gap``, EWMA)
    answer ended (``observe_end``: a tool or the user next): due = end + the gap from such an end to the next call
    idle:     victim score = max(due, now + 4 x (now - alive))         # heavy tails: idle for x,
           alive = the last use, or the end of the answer to it        # expect 4x more
    compacted tail:           due = +inf                               # evicted first

This is Belady's MIN with predictions in place of the future. **Admission**: when the tier is full, a chunk that
would itself be the victim is not admitted (``admit``), so a one-off context larger than the tier cannot flush it,
and the tail of a long context is not stored in place of its own head. A refused chunk is remembered (a ghost), so a
second use finds its gap: one use is no evidence of another, two are (the doorkeeper of TinyLFU). Along a request
the due time never decreases (a child is not needed before its parent), so ties go to the deepest chunk.

Hints: ``observe(keys, session=, now=, retention=)`` tells the policy a request's full key list, its session, the
time (trace time in the simulator) and what retention the request asks for (``kvtier.policy.retention``); a chunk
stored later is a use by the newest of the last ``_MAX_REQUESTS`` hinted requests naming it (an engine hints a batch
first). Without hints the policy runs on ``time.monotonic``, one anonymous session, depth unknown.

**Retention** comes first: every chunk has a rank (``2 x priority + 1 while its ttl runs``) and the victim is the
chunk due last *of the lowest rank*; a chunk of a lower rank than the tier's victim is refused admission. A ttl's
end is noticed lazily (``AgentModel.expire``, before a victim is chosen) and re-queues the chunk under its lower
rank.

One ``AgentModel`` (``kvtier.policy.agent_model``: sessions, chunk predictions) is shared by the policies of
every tier of a hierarchy (``AgentPolicy.family``); each tier's policy keeps its own two heaps (by due, by last sign
of life). Every operation is O(log n) amortised: both keys are fixed between uses, so each use pushes one entry per
heap and stale entries are dropped lazily when they surface.

Memory is bounded by what the tiers hold: a heap that grows past ``_HEAP_GROWTH`` x its tier's chunks (plus
``_HEAP_SLACK``) is rebuilt from its live entries (``AgentPolicy._compact``, amortised O(1) per use; the victims are
the same); the model forgets the least recently seen sessions beyond ``_MAX_SESSIONS`` and the oldest ghosts beyond
``max(4 x chunks held, _MAX_GHOSTS)``."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from kvtier.keys import ChunkKey
from kvtier.policy.agent_model import AgentModel
from kvtier.policy.agent_state import _HEAP_SLACK, _Node
from kvtier.policy.eviction import EvictionPolicy
from kvtier.policy.retention import Retention

__all__ = ["AgentModel", "AgentPolicy"]

_HEAP_GROWTH = 3  # a heap is rebuilt once it holds more entries than this x its tier's chunks (+ _HEAP_SLACK)
_Entry = tuple[int, float, int, int, ChunkKey]  # a heap entry: (rank, -due or last use, -depth, push order, key)
_IDLE = 4.0  # an idle chunk is expected back after _IDLE x its idle time (heavy-tailed gaps)


class AgentPolicy(EvictionPolicy):
    """One tier's eviction order under a shared ``AgentModel``; see the module docstring.

    The victim maximises ``max(due, now + idle x (now - alive))``: the larger of the tops of a heap by ``due`` and a
    heap by ``alive`` (lazy: an entry is live while it matches its chunk). Along a request's prefix ``due`` never
    decreases and ``alive`` never increases, so a parent never goes before its child."""

    name = "agent"
    ranks = True  # ``colder``
    idle = _IDLE  # an idle chunk is expected back after ``idle`` x its idle time

    def __init__(self, model: AgentModel | None = None) -> None:
        self.model = model or AgentModel()
        self.model.members.append(self)
        self.held: set[ChunkKey] = set()
        self._by_due: list[_Entry] = []  # (rank, -due, -depth, seq, key): lowest rank, due last on top
        self._by_age: list[_Entry] = []  # (rank, last use, -depth, seq, key): lowest rank, oldest on top
        self._seq = 0
        self._refused: tuple[int, int, float] = (-1, 0, 0.0)  # (request stamp, depth, due) of a refusal

    @classmethod
    def family(cls, n: int) -> list[EvictionPolicy]:
        """Policies for the ``n`` tiers of one hierarchy, sharing one model."""
        model = AgentModel()
        return [cls(model) for _ in range(n)]

    def observe(self, keys: Sequence[ChunkKey], *, session: str | None = None, now: float | None = None,
                retention: Retention | None = None) -> None:
        self.model.observe(keys, session=session, now=now, retention=retention)

    def observe_end(self, session: str, *, awaits: str) -> None:
        self.model.observe_end(session, awaits)

    def push(self, key: ChunkKey, node: _Node) -> None:
        self._seq += 1
        heapq.heappush(self._by_due, (node.rank, -node.due, -node.depth, self._seq, key))
        heapq.heappush(self._by_age, (node.rank, node.alive, -node.depth, self._seq, key))
        limit = _HEAP_GROWTH * len(self.held) + _HEAP_SLACK
        if len(self._by_due) > limit:
            self._by_due = self._compact(self._by_due, True)
        if len(self._by_age) > limit:
            self._by_age = self._compact(self._by_age, False)

    def _compact(self, heap: list[_Entry], due: bool) -> list[_Entry]:
        """``heap`` with, for each chunk held, only its live entry that surfaces first: the entries ``_live`` would
        drop, and the duplicates a later use with the same prediction pushed behind it, go. The one order that can
        change: a chunk whose prediction comes back exactly to an earlier one (re-inserted unchanged after a move
        between tiers, or buried again at the same depth) would have revived an old entry, and now goes behind its
        exact ties (tests/policy/test_policy_bounded.py compares every decision of a soak with and without
        compaction; the simulator's hit ratios are the same to the last digit). O(len(heap)), once per
        ``(_HEAP_GROWTH - 1) x len(held) + _HEAP_SLACK`` pushes at most."""
        nodes, held = self.model.nodes, self.held
        first: dict[ChunkKey, _Entry] = {}
        for entry in heap:  # live as in ``_live``
            key = entry[4]
            if key in held and (node := nodes.get(key)) is not None and node.depth == -entry[2] and (
                    node.rank == entry[0]) and (node.due == -entry[1] if due else node.alive == entry[1]):
                kept = first.get(key)
                if kept is None or entry < kept:
                    first[key] = entry
        live = list(first.values())
        heapq.heapify(live)
        return live

    def insert(self, key: ChunkKey, size: int) -> None:
        node = self.model.touch(key)
        if key not in self.held:
            self.held.add(key)
            node.tiers += 1
        self.push(key, node)

    def access(self, key: ChunkKey) -> None:
        if key in self.held:
            self.push(key, self.model.touch(key))

    def remove(self, key: ChunkKey) -> None:
        if key in self.held:
            self.held.discard(key)
            self.model.release(key)

    def admit(self, key: ChunkKey, size: int) -> bool:
        """Would ``key``, entering a full tier, not be the victim itself?"""
        model = self.model
        refused = self._refused
        stamp, position = model.request_of(key)
        if stamp >= 0 and refused[0] == stamp and position > refused[1]:  # its parent was refused
            model.remember(key, refused[2], position)
            return False
        top = self._victim()
        if top is None:
            return True
        due, depth = model.predict(key)
        if (-model.rank_of(key), due, depth) < top[:3]:
            return True
        model.remember(key, due, depth)
        if stamp >= 0:  # its descendants in its request are refused too (a child needs its parent)
            self._refused = (stamp, depth, due)
        return False

    def pop_victim(self, evictable: Callable[[ChunkKey], bool]) -> ChunkKey | None:
        skipped: list[tuple[list[_Entry], _Entry]] = []
        victim = None
        while (top := self._victim()) is not None:
            heap = self._by_due if top[3] else self._by_age
            entry = heapq.heappop(heap)
            if evictable(entry[4]):
                victim = entry[4]
                break
            skipped.append((heap, entry))  # pinned or in use: put back once the search ends
        for heap, entry in skipped:
            heapq.heappush(heap, entry)
        if victim is not None:
            self.held.discard(victim)
            self.model.release(victim)
        return victim

    def _victim(self) -> tuple[int, float, int, bool] | None:
        """(-rank, score, depth, from the due heap) of the next victim (the largest first three), or None."""
        self.model.expire()
        by_due, by_age = self._live(self._by_due, True), self._live(self._by_age, False)
        now = self.model.now
        due = None if by_due is None else (-by_due[0], -by_due[1], -by_due[2], True)
        aged = None if by_age is None else (-by_age[0], now + self.idle * (now - by_age[1]), -by_age[2], False)
        if due is None or aged is None:
            return due or aged
        return due if due[:3] >= aged[:3] else aged

    def colder(self, victim: ChunkKey, than: ChunkKey) -> bool:
        """Is ``victim`` (held here) ranked for eviction before ``than`` (held in some tier)?"""
        nodes, now = self.model.nodes, self.model.now
        a, b = nodes.get(victim), nodes.get(than)
        if a is None or b is None:
            return False

        def order(n: _Node) -> tuple[int, float]:  # as ``_victim`` orders them (the larger goes first)
            return -n.rank, max(n.due, now + self.idle * (now - n.alive))
        return order(a) > order(b)

    def _live(self, heap: list[_Entry], due: bool) -> _Entry | None:
        """The top of ``heap`` once its stale entries are popped; None if it is empty."""
        nodes, held = self.model.nodes, self.held
        while heap:
            rank_, value, neg_depth, _, key = heap[0]
            node = nodes.get(key)
            if key in held and node is not None and node.depth == -neg_depth and node.rank == rank_ and (
                    node.due == -value if due else node.alive == value):
                return heap[0]
            heapq.heappop(heap)
        return None

    def __len__(self) -> int:
        return len(self.held)
