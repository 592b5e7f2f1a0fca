"""G2 shared by a node: the ``node`` tier, a client of ``kvtier serve`` (``kvtier.node.server``).

The service owns one DRAM pool in shared memory and its slot table; this tier maps the pool and moves
bytes in and out of it by slot number, so a chunk stored by one engine process is a DRAM hit in
every other process of the node, and outlives the engine that stored it.

* ``put_many``: ``reserve`` (a slot per new key; keys the pool holds already cost nothing), copy each
  payload into its slot, ``commit``.  Until the commit no reader sees the slot; if this process
  dies first, the service frees it unpublished.
* ``get_many_into``: ``acquire`` (each hit's slot pinned against eviction), copy out, ``release``.
* ``contains_many`` / ``delete_many``: ``lookup`` / ``delete``.

**Never an error into the caller, never a stall past the deadline.**  Every wait of a call (the
connection's lock, connecting, each answer) comes out of one budget of ``node.deadline_s``; copies
do not (they are this process's own memory bandwidth).  A service that is down, slow or refuses this
process (another layout) makes the call a miss or a refused put, counted in ``stats.errors``; the
connection is dropped and for ``node.retry_s`` calls are misses at once (``short_circuited``); the
next call after that reconnects, to a restarted service too (a new pool: the old one is unmapped).

**No torn chunks after a failure.**  A connection that failed is closed only once no call of this
process is still copying through it: the service keeps those calls' reservations and pins until
then, so a slot is never reused under a copy.  Bytes read from a slot acquired before the service
died are whole (nobody else may write a published slot).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.config_node import NodeConfig, socket_path
from kvtier.errors import TierUnavailableError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.base import TierCapabilities
from kvtier.tiers.node_wire import HELD, NodeConnection, NodeRefused, keys_hex
from kvtier.tiers.remote import RemoteTier

log = logging.getLogger(__name__)
_LOG_EVERY_S = 10.0


class _Budget:
    """What is left of one call's waiting time."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds


_Reply = tuple[NodeConnection, list[int], _Budget]


class NodeTier(RemoteTier):
    name = "node"
    what = "kvtier serve"
    capabilities = TierCapabilities(shared=True)

    def __init__(self, layout: KVLayout, config: NodeConfig, *, capacity_hint: int = 0) -> None:
        """``capacity_hint``: ``capacity_bytes`` until the service first answers (then its pool's size)."""
        super().__init__(layout, key_prefix="node", capacity=capacity_hint, deadline_s=config.deadline_s,
                         counters=("refused_writes", "reconnects"))
        self.path = socket_path(config.url)
        self._retry_s = config.retry_s
        self._conn: NodeConnection | None = None
        self._io = threading.Lock()  # one request at a time on the connection; connecting
        self._state = threading.Lock()  # _conn, users and broken of connections, _retry_at
        self._retry_at = 0.0
        self._logged = -_LOG_EVERY_S
        self._connected_once = False
        self._closed = False
        conn = self._begin(_Budget(self._deadline_s))  # connect now: the pool's size, and any refusal logged
        if conn is not None:
            self._end(conn)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    # --- the connection ------------------------------------------------------------------------
    def _begin(self, budget: _Budget) -> NodeConnection | None:
        """The live connection, marked in use until ``_end`` (None: the service is not reachable now)."""
        with self._state:
            conn = self._conn
            if conn is not None:
                conn.users += 1
                return conn
            if self._closed or time.monotonic() < self._retry_at:
                return None
        start = time.monotonic()
        if not self._io.acquire(timeout=max(budget.left, 0.0)):
            budget.left -= time.monotonic() - start
            return None
        try:
            with self._state:
                if self._conn is None and not self._closed and time.monotonic() >= self._retry_at:
                    self._conn = self._connect(budget.left - (time.monotonic() - start))
                conn = self._conn
                if conn is not None:
                    conn.users += 1
            return conn
        finally:
            self._io.release()
            budget.left -= time.monotonic() - start

    def _connect(self, timeout: float) -> NodeConnection | None:
        """Under both locks: a new connection, or None with the retry time set and the failure logged."""
        try:
            conn = NodeConnection(self.path, self.layout, timeout)
        except TierUnavailableError as exc:
            self._retry_at = time.monotonic() + self._retry_s
            self._say(logging.ERROR if isinstance(exc, NodeRefused) else logging.WARNING,
                      f"{exc}; node tier calls are misses (retry in {self._retry_s:g} s)")
            return None
        self._capacity = conn.num_slots * conn.slot_bytes
        if self._connected_once:
            self.stats.extra["reconnects"] += 1
        self._connected_once = True
        log.info("connected to kvtier serve at %s: %d slots of %d bytes", self.path, conn.num_slots, conn.slot_bytes)
        return conn

    def _end(self, conn: NodeConnection) -> None:
        with self._state:
            conn.users -= 1
            last = conn.broken and not conn.users
        if last:
            conn.close()

    def _fail(self, conn: NodeConnection, exc: Exception) -> None:
        """The connection failed: no more requests on it; closed once no call copies through it."""
        with self._state:
            if conn.broken:
                return
            conn.broken = True
            if self._conn is conn:
                self._conn = None
                self._retry_at = time.monotonic() + self._retry_s
        self._say(logging.WARNING, f"{exc}; node tier calls are misses (retry in {self._retry_s:g} s)")

    def _say(self, level: int, message: str) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            log.log(level, "%s (%s)", message, self.path)

    def _request(self, conn: NodeConnection, message: dict[str, Any], budget: _Budget) -> dict[str, Any] | None:
        """One request within the budget; None (the call's keys are misses) if it failed."""
        start = time.monotonic()
        try:
            if not self._io.acquire(timeout=max(budget.left, 0.0)):
                return None
            try:
                if conn.broken:
                    return None
                return conn.request(message, budget.left - (time.monotonic() - start))
            finally:
                self._io.release()
        except TierUnavailableError as exc:
            self._fail(conn, exc)
            return None
        finally:
            budget.left -= time.monotonic() - start

    def _batch(self, op: str, keys: Sequence[ChunkKey], field: str) -> _Reply | None:
        """``op`` on ``keys``: the connection (in use: ``_end`` it), the answer's list and the budget
        left, or None (counted)."""
        budget = _Budget(self._deadline_s)
        conn = self._begin(budget)
        if conn is None:
            if budget.left <= 0 or self._closed:
                self._count(errors=len(keys))
            else:
                self._count(short_circuited=len(keys))
            return None
        answer = self._request(conn, {"op": op, "keys": keys_hex(list(keys))}, budget)
        values = answer.get(field) if answer is not None else None
        if not isinstance(values, list) or len(values) != len(keys):
            self._end(conn)
            self._count(errors=len(keys))
            return None
        return conn, [int(v) for v in values], budget

    # --- the tier -------------------------------------------------------------------------------
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        for payload in payloads:
            self.layout.check_payload(payload)
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # a key twice: written once
        unique = list(first)
        stored = dict.fromkeys(unique, False)
        reply = self._batch("reserve", unique, "slots") if unique else None
        if reply is not None:
            conn, slots, budget = reply
            try:
                mine = [(key, slot) for key, slot in zip(unique, slots, strict=True) if slot >= 0]
                for key, slot in mine:
                    np.copyto(conn.slot(slot), payloads[first[key]])
                done = not mine or self._request(conn, {"op": "commit", "slots": [s for _, s in mine]},
                                                 budget) is not None
            finally:
                self._end(conn)
            for key, slot in zip(unique, slots, strict=True):
                stored[key] = slot == HELD or (slot >= 0 and done)
            refused = sum(slot < 0 and slot != HELD for slot in slots)
            if refused:
                self._refused(refused, "the pool is full of reserved or pinned chunks", log)
            if mine and not done:
                self._count(errors=len(mine))
            self._found([k for k in unique if stored[k]], len(mine) * self.layout.chunk_bytes if done else 0,
                        written=True)
        return [stored[key] for key in keys]

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        found = [False] * len(keys)
        reply = self._batch("acquire", keys, "slots") if keys else None
        if reply is None:
            return found
        conn, slots, budget = reply
        try:
            hits = [i for i, slot in enumerate(slots) if slot >= 0]
            for i in hits:
                np.copyto(outs[i][:conn.slot_bytes], conn.slot(slots[i]))
                found[i] = True
            if hits:  # a failed release is harmless: the service drops a closed connection's pins
                self._request(conn, {"op": "release", "slots": [slots[i] for i in hits]}, budget)
        finally:
            self._end(conn)
        self._found([keys[i] for i in hits], len(hits) * self.layout.chunk_bytes)
        self._gone([key for key, hit in zip(keys, found, strict=True) if not hit])
        return found

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        reply = self._batch("lookup", keys, "present") if keys else None
        if reply is None:
            return [False] * len(keys)
        self._end(reply[0])
        self._gone([key for key, present in zip(keys, reply[1], strict=True) if not present])
        return [bool(p) for p in reply[1]]

    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        reply = self._batch("delete", keys, "deleted") if keys else None
        if reply is None:
            return [False] * len(keys)
        self._end(reply[0])
        self._gone(keys)
        return [bool(d) for d in reply[1]]

    def service_stats(self) -> dict[str, Any] | None:
        """The service's counters (pool use, clients, reclaimed reservations), or None if down."""
        budget = _Budget(self._deadline_s)
        conn = self._begin(budget)
        if conn is None:
            return None
        try:
            return self._request(conn, {"op": "stats"}, budget)
        finally:
            self._end(conn)

    def close(self) -> None:
        """Drop the connection (once no call copies through it); later calls are misses."""
        with self._state:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.broken = True
            last = conn is not None and not conn.users
        if last and conn is not None:
            conn.close()
