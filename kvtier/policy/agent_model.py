"""The agent policy's model (``kvtier.policy.agent``): sessions and per-chunk predictions.

One ``AgentModel`` is shared by the policies of every tier of a hierarchy.  It turns hints
(``observe``: a request's keys, session, time and retention; ``observe_end``: what an answer waits
for) and uses (``touch``) into each chunk's predicted next use ``due``, its depth and its rank,
and tells the tier policies holding a chunk when its prediction changes outside a use
(``_repush``).  It keeps no heap and picks no victim: that is each ``AgentPolicy``'s.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvtier.keys import ChunkKey
from kvtier.policy.agent_state import _DEAD, _HEAP_SLACK, _MAX_REQUESTS, _Node, _Request, _Session
from kvtier.policy.retention import AWAITS, Retention, rank

if TYPE_CHECKING:
    from kvtier.policy.agent import AgentPolicy

_EWMA = 0.2  # weight of the newest gap
_MAX_SESSIONS = 4096  # sessions remembered (least recently seen forgotten first)
_MAX_GHOSTS = 4096  # ghosts remembered beyond 4 per chunk held (oldest forgotten first)
_HORIZON_S = 1e9  # a chunk never seen, of a session with no history: not expected back


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
