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

One ``AgentModel`` (sessions, chunk predictions) is shared by the policies of every tier of a hierarchy
(``AgentPolicy.family``); each tier's policy keeps its own two heaps (by due, by last sign of life). Every operation
is O(log n) amortised: both keys are fixed between uses, so each use pushes one entry per heap and stale entries are
dropped lazily when they surface.

Memory is bounded by what the tiers hold: a heap that grows past ``_HEAP_GROWTH`` x its tier's chunks (plus
``_HEAP_SLACK``) is rebuilt from its live entries (``AgentPolicy._compact``, amortised O(1) per use; the victims are
the same); the model forgets the least recently seen sessions beyond ``_MAX_SESSIONS`` and the oldest ghosts beyond
``max(4 x chunks held, _MAX_GHOSTS)``."""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvtier.keys import ChunkKey
from kvtier.policy.agent_state import _DEAD, _MAX_REQUESTS, _Node, _Request, _Session
from kvtier.policy.eviction import AWAITS, EvictionPolicy
from kvtier.policy.retention import Retention, rank

_EWMA = 0.2  # weight of the newest gap
_MAX_SESSIONS = 4096  # sessions remembered (least recently seen forgotten first)
_MAX_GHOSTS = 4096  # ghosts remembered beyond 4 per chunk held (oldest forgotten first)
_HEAP_GROWTH = 3  # a heap is rebuilt once it holds more entries than this x its tier's chunks ...
_HEAP_SLACK = 64  # ... + this (stale entries at most twice the live ones, amortised O(1) per use)
_Entry = tuple[int, float, int, int, ChunkKey]  # a heap entry: (rank, -due or last use, -depth, push order, key)
_HORIZON_S = 1e9  # a chunk never seen, of a session with no history: not expected back
_IDLE = 4.0  # an idle chunk is expected back after _IDLE x its idle time (heavy-tailed gaps)


class AgentModel:
    """Sessions and per-chunk predictions, shared by the policies of one hierarchy's tiers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.now = 0.0
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.nodes: dict[ChunkKey, _Node] = {}
        self.ghosts: OrderedDict[ChunkKey, _Node] = OrderedDict()  # recently evicted: history kept
        self.members: list[AgentPolicy] = []
        self.class_gaps: dict[str, float] = {}  # EWMA over every session of the gaps after each kind of end
        self.first_gap: float | None = None  # EWMA over every session of the gap between its first two calls
        self.reuse_gap: float | None = None  # EWMA over every chunk of its inter-use gaps (anonymous requests)
        self._stamp = 0
        self._hinted = False
        # hinted requests, newest last, and the newest one naming each chunk: an engine stores the chunks
        # of a batch of requests (over several steps of chunked prefill) after hinting them all
        self._requests: OrderedDict[int, _Request] = OrderedDict()
        self._request_of: dict[ChunkKey, int] = {}
        self._expiry: list[tuple[float, ChunkKey]] = []  # (keep_until, key) of chunks a ttl keeps

    def observe(self, keys: Sequence[ChunkKey], *, session: str | None = None, now: float | None = None,
                retention: Retention | None = None) -> None:
        self._hinted = True
        self.now = self._clock() if now is None else max(self.now, now)
        self._stamp += 1
        req = _Request(self._stamp, session, None, {k: i for i, k in enumerate(keys)},
                       retention if retention is not None and retention != Retention() else None)
        self._requests[req.stamp] = req
        for key in keys:
            self._request_of[key] = req.stamp
        while len(self._requests) > _MAX_REQUESTS:
            _, old = self._requests.popitem(last=False)
            for key in old.depth:
                if self._request_of.get(key) == old.stamp:
                    del self._request_of[key]
        if req.retention is not None:  # chunks held already take it now (those stored later: ``touch``)
            for key in keys:
                node = self.nodes.get(key)
                if node is not None and self._retain(key, node, req.retention):
                    self._repush(key, node)
        if session is None:
            return
        s = self.sessions.get(session)
        if s is None:
            s = self.sessions[session] = _Session(last_t=self.now, gap=None, keys=keys)
            while len(self.sessions) > _MAX_SESSIONS:
                self.sessions.popitem(last=False)
        else:
            self.sessions.move_to_end(session)
            gap = self.now - s.last_t
            if s.gap is None:  # its second call: how long a new session takes to come back
                self.first_gap = gap if self.first_gap is None else _EWMA * gap + (1 - _EWMA) * self.first_gap
            s.gap = gap if s.gap is None else _EWMA * gap + (1 - _EWMA) * s.gap
            if s.awaits is not None:  # the gap after that kind of end, from the end
                wait = max(0.0, self.now - s.end_t)
                for gaps in (s.class_gap, self.class_gaps):
                    before = gaps.get(s.awaits)
                    gaps[s.awaits] = wait if before is None else _EWMA * wait + (1 - _EWMA) * before
                s.awaits = None
            self._bury_tail(session, s.keys, keys)
            s.last_t, s.keys = self.now, keys
        req.session = s

    def observe_end(self, session: str, awaits: str) -> None:
        """``session``'s last request got its answer, which waits for ``awaits``: "tool" (back in seconds) or "user"
        (minutes). Its chunks are then due at the end plus the gap this session (else any) had from such an end to
        its next call, unless another session reads them sooner; the end is a sign of life (``alive``)."""
        if awaits not in AWAITS:
            raise ValueError(f"awaits must be one of {AWAITS}, got {awaits!r}")
        s = self.sessions.get(session)
        if s is None:
            return
        s.awaits = awaits
        s.end_t = end = max(s.last_t, self._clock() if not self._hinted else self.now)
        gap = s.class_gap.get(awaits, self.class_gaps.get(awaits))
        for key in s.keys:
            node = self.nodes.get(key)
            if node is None or node.owner != session or node.last_t != s.last_t or node.due == _DEAD:
                continue  # not this request's use (a later one's, or gone), or a buried tail
            node.alive = end
            if gap is not None:  # else no gap after this kind of end seen yet: the prediction stands
                due = end + gap
                node.due = min(due, node.due) if node.due < node.own else due
                node.own = due
            self._repush(key, node)

    def _bury_tail(self, session: str, old: Sequence[ChunkKey], new: Sequence[ChunkKey]) -> None:
        """The session compacted (its new context leaves its old one): its old tail is dead."""
        common = 0
        for a, b in zip(old, new, strict=False):
            if a != b:
                break
            common += 1
        if common >= len(old):
            return
        for key in old[common:]:
            node = self.nodes.get(key)
            if node is not None and node.owner == session and node.due != _DEAD:
                node.due = _DEAD
                self._repush(key, node)

    def _repush(self, key: ChunkKey, node: _Node) -> None:
        """``node``'s due changed outside a use: every tier policy holding it re-queues it."""
        for member in self.members:
            if key in member.held:
                member.push(key, node)

    @property
    def stamp(self) -> int:
        return self._stamp

    @property
    def hinted(self) -> bool:
        return self._hinted

    def _hinted_request(self, key: ChunkKey) -> _Request | None:
        """The newest hinted request naming ``key`` (None: none of the last ``_MAX_REQUESTS``, or no hints)."""
        return self._requests.get(self._request_of.get(key, -1))

    def request_of(self, key: ChunkKey) -> tuple[int, int]:
        """(stamp, position) of ``key`` in the newest hinted request naming it; (-1, -1) if none."""
        req = self._hinted_request(key)
        return (-1, -1) if req is None else (req.stamp, req.depth[key])

    def depth_of(self, key: ChunkKey) -> int:
        """``key``'s position in the newest hinted request naming it (-1 if none, or no hint)."""
        return self.request_of(key)[1]

    def predict(self, key: ChunkKey) -> tuple[float, int]:
        """(due, depth) ``key`` would get if its request used it now; changes nothing."""
        node = self.nodes.get(key) or self.ghosts.get(key)
        now = self._clock() if not self._hinted else self.now
        req = self._hinted_request(key)
        if node is not None and self._hinted and (req is None or node.stamp == req.stamp):
            return node.due, node.depth  # used already, or moving between tiers (no use)
        due = now + self._gap(node, now, None if req is None else req.session)
        if node is not None and now < node.due < _DEAD:  # another session's call is predicted sooner
            due = min(due, node.due)
        if req is None:
            return due, 0
        depth = req.depth[key]
        if depth > req.floor_depth:  # a child is not needed before its parent
            due = max(due, req.floor)
        return due, depth

    def touch(self, key: ChunkKey) -> _Node:
        """Update ``key``'s prediction for a use by the current request (once per request)."""
        if not self._hinted:
            self.now = self._clock()
            self._stamp += 1
        req = self._hinted_request(key)
        stamp = self._stamp if req is None else req.stamp
        node = self.nodes.get(key)
        if node is None:
            node = self.ghosts.pop(key, None)
            if node is not None:
                self.nodes[key] = node
        if node is not None and (node.stamp == stamp or (self._hinted and req is None)):
            return node  # used by this request already, or moving between tiers: not a use
        due, depth = self.predict(key)
        now = self.now
        own = now + self._gap(node, now, None if req is None else req.session)
        if node is None:
            node = self.nodes[key] = _Node(last_t=now, alive=now, due=due, depth=depth, gap=None, owner=None, stamp=0)
        else:
            reuse = now - node.last_t
            node.gap = reuse if node.gap is None else _EWMA * reuse + (1 - _EWMA) * node.gap
            if reuse > 0:
                self.reuse_gap = reuse if self.reuse_gap is None else _EWMA * reuse + (1 - _EWMA) * self.reuse_gap
        node.last_t, node.alive, node.due, node.depth, node.stamp = now, now, due, depth, stamp
        node.own = max(own, due)
        node.owner = None if req is None else req.session_id
        if req is not None:
            if depth >= req.floor_depth:
                req.floor, req.floor_depth = due, depth
            if req.retention is not None:
                self._retain(key, node, req.retention)
        return node

    def _retain(self, key: ChunkKey, node: _Node, r: Retention) -> bool:
        """Give ``node`` a request's retention ``r``; True if its rank changed."""
        if r.priority is not None:
            node.priority = r.priority
        if r.ttl_s is not None and self.now + r.ttl_s > node.keep_until:
            node.keep_until = self.now + r.ttl_s
            heapq.heappush(self._expiry, (node.keep_until, key))
            if len(self._expiry) > 2 * len(self.nodes) + _HEAP_SLACK:  # stale entries: keep it bounded
                self._expiry = [(n.keep_until, k) for k, n in self.nodes.items() if n.keep_until > self.now]
                heapq.heapify(self._expiry)
        before, node.rank = node.rank, rank(node.priority, node.keep_until, self.now)
        return node.rank != before

    def rank_of(self, key: ChunkKey) -> int:
        """The rank ``key`` has, or would get if the current request used it now; changes nothing."""
        node = self.nodes.get(key) or self.ghosts.get(key)
        priority, keep = (0, -math.inf) if node is None else (node.priority, node.keep_until)
        req = self._hinted_request(key)
        r = None if req is None else req.retention
        if r is not None:
            priority = priority if r.priority is None else r.priority
            keep = keep if r.ttl_s is None else max(keep, self.now + r.ttl_s)
        return rank(priority, keep, self.now)

    def expire(self) -> None:
        """Chunks whose ttl ended go back to their priority's rank (re-queued)."""
        while self._expiry and self._expiry[0][0] <= self.now:
            _, key = heapq.heappop(self._expiry)
            node = self.nodes.get(key)
            if node is not None and node.rank != (now_rank := rank(node.priority, node.keep_until, self.now)):
                node.rank = now_rank
                self._repush(key, node)

    def _gap(self, node: _Node | None, now: float, s: _Session | None) -> float:
        if node is not None:  # used before: its own rhythm, this use included
            reuse = now - node.last_t
            if node.gap is not None:
                return _EWMA * reuse + (1 - _EWMA) * node.gap if reuse > 0 else node.gap
            if reuse > 0:
                return reuse
        # else its session's rhythm; a new session's: as new sessions came back so far; no session: as chunks came
        # back so far (a first use predicted "never" keeps every new chunk out of a full tier until its second use)
        gap = self.reuse_gap if s is None else s.gap if s.gap is not None else self.first_gap
        return _HORIZON_S if gap is None else gap

    def remember(self, key: ChunkKey, due: float, depth: int) -> None:
        """``key`` was used now (predicted ``due``) but not admitted: a ghost keeps the use to recognise a reuse."""
        if key not in self.nodes and key not in self.ghosts:  # a known ghost keeps its first sighting
            req = self._hinted_request(key)
            self.ghosts[key] = _Node(last_t=self.now, alive=self.now, due=due, depth=depth, gap=None,
                                     owner=None if req is None else req.session_id,
                                     stamp=self._stamp if req is None else req.stamp)
            if len(self.ghosts) > _MAX_GHOSTS and len(self.ghosts) > 4 * len(self.nodes):
                self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        while len(self.ghosts) > max(4 * len(self.nodes), _MAX_GHOSTS):
            self.ghosts.popitem(last=False)

    def release(self, key: ChunkKey) -> None:
        """A tier policy dropped ``key``; once no tier holds it, keep its history as a ghost."""
        node = self.nodes.get(key)
        if node is None:
            return
        node.tiers -= 1
        if node.tiers <= 0:
            del self.nodes[key]
            self.ghosts[key] = node
            self._trim_ghosts()


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
