"""G4 on Redis or Valkey, standalone or Cluster: chunks shared by every instance and node.

Key: ``<key_prefix>:<layout fingerprint, 16 hex>:<chunk key, 32 hex>`` (bytes).  No hash tag,
so in a Cluster the chunks of one conversation spread over every shard by CRC16 slot.  Value:
the chunk format of ``kvtier.codec`` (64-byte header with checksums, then the payload), written
with ``SET`` (``EX ttl_s`` when a TTL is configured).  A value failing validation (truncated,
bit rot, another layout) is deleted, counted in ``stats.corrupt`` and reported as a miss.

Batches go out as one pipeline per shard, each shard behind its own circuit breaker, every call
within ``deadline_s``: ``kvtier.tiers.redis_client`` (routing, pipelines, the deadline watchdog,
what a shard fault does).  Failures are counted in ``stats.errors`` (keys whose operation
failed) and ``stats.extra["short_circuited"]`` (keys answered by an open breaker); nothing
raises into the caller.  A write the server refuses (an ACL without write permission: NOPERM;
``maxmemory`` reached: OOM; any ``-ERR``) is no shard failure: it counts in ``stats.errors`` and
``stats.extra["refused_writes"]`` and is logged at most once every 10 s.

Consistency: same key means same bytes, so racing writers are harmless.  ``used_bytes`` counts
the chunks this process wrote or found (the server may evict or expire more); ``keys()`` yields
those, ``scan_keys()`` the whole server (``SCAN MATCH`` on every primary).

Key naming, the known set and budget, counters, corrupt-chunk handling and the per-call deadline
are ``RemoteTier``'s (``kvtier.tiers.remote``); this module encodes values and reads replies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import redis

from kvtier.codec import HEADER_BYTES, decode_chunk_into, encode_header
from kvtier.config.schema import RedisConfig
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.breaker import CircuitBreaker
from kvtier.tiers.redis_client import Queue, ShardedRedis
from kvtier.tiers.remote import RemoteTier

log = logging.getLogger(__name__)


class RedisTier(RemoteTier):
    name = "redis"
    what = "Redis"

    def __init__(self, layout: KVLayout, config: RedisConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or RedisConfig()
        super().__init__(layout, key_prefix=self.config.key_prefix, capacity=self.config.capacity,
                         deadline_s=self.config.deadline_s, counters=("refused_writes",))
        self._bprefix = self._prefix.encode()  # of every redis key of this tier (SCAN MATCH)
        self._values = _ValueBuffers(HEADER_BYTES + layout.chunk_bytes, keep_bytes=self.config.staging_bytes)
        self._redis = ShardedRedis(self.config, clock=clock, call_deadline=self._call_deadline, count=self._count,
                                   breaker_failed=self._breaker_failed)

    def probe(self) -> str | None:
        """Why the server (or the cluster's seed node) does not answer a PING now, or None."""
        return self._redis.probe()

    @property
    def url(self) -> str:
        """The server URL; ``rediss://`` (TLS) whenever a TLS file is configured."""
        return self._redis.url

    # --- keys ---------------------------------------------------------------------------------
    def redis_key(self, key: ChunkKey) -> bytes:
        return self._bprefix + key.hex().encode()

    def _batch(self, keys: Sequence[ChunkKey], queue: Queue) -> list[Any]:
        """One pipelined command per key (``ShardedRedis.batch``) under this call's deadline."""
        with self._deadline() as deadline:
            return self._redis.batch(deadline, [self.redis_key(k) for k in keys], queue)

    # --- Tier interface -----------------------------------------------------------------------
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) != len(payloads):
            raise ValueError("put_many needs one payload per key")
        for payload in payloads:
            self.layout.check_payload(payload)
        todo = self._within_budget(keys, payloads)  # the rest: over this process's budget, nothing sent
        ttl = self.config.ttl_s
        used: list[np.ndarray] = []  # value buffers to give back (list.append is atomic)

        def queue(pipe: Any, j: int, rkey: bytes) -> None:
            i = todo[j]
            value = self._values.encode(keys[i], self.layout.fingerprint, payloads[i])
            used.append(value)
            pipe.set(rkey, value.data, ex=ttl)

        try:
            replies = self._batch([keys[i] for i in todo], queue)
        finally:
            self._values.give(used)
        ok = [False] * len(keys)
        for i, reply in zip(todo, replies, strict=True):
            ok[i] = reply is True
        self._found([keys[i] for i in todo if ok[i]], sum(payloads[i].nbytes for i in todo if ok[i]), written=True)
        refused = [r for r in replies if isinstance(r, redis.ResponseError)]
        if refused:
            self._refused(len(refused), refused[0], log)
        return ok

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) != len(outs):
            raise ValueError("get_many_into needs one buffer per key")
        replies = self._batch(keys, lambda pipe, i, rkey: pipe.get(rkey))
        ok = [False] * len(keys)
        corrupt: list[ChunkKey] = []
        nbytes = 0
        for i, reply in enumerate(replies):
            if not isinstance(reply, bytes):
                if reply is None or isinstance(reply, redis.ResponseError):
                    self._gone([keys[i]])
                continue
            try:
                nbytes += decode_chunk_into(reply, outs[i], key=keys[i], layout_fingerprint=self.layout.fingerprint,
                                            chunk_bytes=self.layout.chunk_bytes)
            except ChunkFormatError as exc:
                self._corrupt(keys[i], exc, log)
                corrupt.append(keys[i])
                continue
            ok[i] = True
        self._found([k for k, good in zip(keys, ok, strict=True) if good], nbytes)
        self._drop_corrupt(corrupt)
        return ok

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        replies = self._batch(keys, lambda pipe, i, rkey: pipe.exists(rkey))
        return [isinstance(r, int) and r > 0 for r in replies]

    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        replies = self._batch(keys, lambda pipe, i, rkey: pipe.delete(rkey))
        self._gone([key for key, r in zip(keys, replies, strict=True)
                    if r is not None and not isinstance(r, Exception)])
        return [isinstance(r, int) and r > 0 for r in replies]

    def scan_keys(self) -> Iterator[ChunkKey]:
        """Every chunk of this layout and prefix on the server(s) (``SCAN``); shards down are skipped."""
        for rkey in self._redis.scan(self._bprefix + b"*"):
            key = self.chunk_key(rkey.decode(errors="replace"))
            if key is not None:
                yield key

    def close(self) -> None:
        self._redis.close()

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Each shard's breaker by ``host:port`` (``"standalone"`` for one server)."""
        return self._redis.breakers()


class _ValueBuffers:
    """Reusable value buffers for puts (SET takes one contiguous value: header + payload).

    Fresh multi-MiB buffers cost page faults and zero-filling on every put; reused ones cost
    one memcpy.  Up to ``keep_bytes`` of buffers are kept between calls; beyond that a put
    allocates and drops its own.
    """

    def __init__(self, value_bytes: int, keep_bytes: int) -> None:
        self.value_bytes = value_bytes
        self._keep = max(2, keep_bytes // value_bytes)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(self.value_bytes, dtype=np.uint8)

    def give(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            self._free.extend(bufs[:max(0, self._keep - len(self._free))])

    def encode(self, key: ChunkKey, fingerprint: int, payload: np.ndarray) -> np.ndarray:
        """Header + payload in one buffer: the put path's one copy."""
        buf = self.take()
        buf[:HEADER_BYTES] = np.frombuffer(encode_header(key, fingerprint, payload), dtype=np.uint8)
        buf[HEADER_BYTES:] = payload
        return buf

