"""The Redis tier's connections: routes keys to shards and sends one pipeline per shard.

Batches go out as one pipeline per shard (``transaction=False``): every shard's commands are
sent before any reply is read, so the shards work in parallel and a batch costs about one
round trip.  In Cluster mode keys are routed here from the cluster's slot map
(``RedisCluster.get_node_from_key``) rather than through ``RedisCluster``'s own pipeline, so that
each shard has its own circuit breaker: when a shard dies only its keys turn into misses, and the
shards left keep serving.

Deadline: every call (a batch over any number of shards) ends within ``deadline_s``.  A socket
timeout bounds one read only, so a server that trickles a byte per read could hold a call for
minutes; a watchdog thread shuts down the sockets of a call past its deadline, which wakes the
blocked read or write at once (a new connection's set-up too: AUTH, SELECT, CLIENT SETINFO).
Such a call is a shard failure like a timeout: its keys are counted misses and the breaker hears
of it.

Faults: a connection error or timeout on a shard records a failure on that shard's
``CircuitBreaker``; after ``failure_threshold`` failures the breaker opens and the shard's keys
are misses at once (no socket wait) until a backoff passes and one probe request succeeds.
Nothing raises into the caller: failures are counted through the tier's counters (``count``,
``breaker_failed``).  A server that is unreachable is said once at WARNING (standalone or
cluster) when it stops answering, and once at INFO when it answers again.  redis-py's own
retries are turned off: the breaker is the retry policy.  A slot that moved (MOVED/ASK after a
failover or resharding) is a miss and refreshes the slot map.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvtier.config.schema import RedisConfig
from kvtier.tiers.breaker import CircuitBreaker, Deadline

# The tier's logger: what is said about the servers stays under one name, ``kvtier.tiers.redis``.
log = logging.getLogger("kvtier.tiers.redis")

# Errors that mean "this shard is unreachable or sick": they feed the breaker.
SHARD_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)
SHARD_FAULTS = (*SHARD_DOWN, redis.RedisError)  # a request failing with one of these is the shard's fault
_TOPOLOGY_REFRESH_S = 1.0  # at most one slot-map refresh per second


class Count(Protocol):
    """Counts keys that failed or were answered by an open breaker (``RemoteTier._count``)."""

    def __call__(self, *, errors: int = 0, short_circuited: int = 0) -> None: ...


class BreakerFailed(Protocol):
    """Tells ``breaker`` of a failure and counts ``errors`` (``RemoteTier._breaker_failed``)."""

    def __call__(self, breaker: CircuitBreaker, *, errors: int = 0) -> None: ...


@dataclass(slots=True)
class Shard:
    """One Redis server the tier talks to (a standalone server or a cluster primary)."""

    name: str  # host:port
    client: redis.Redis[bytes]  # decode_responses=False
    breaker: CircuitBreaker
    down: bool = False  # said unreachable (WARNING) and not answered since


Queue = Callable[[Any, int, bytes], None]  # (pipeline, i, redis key): add key i's command


class ShardedRedis:
    """A standalone server or a cluster's primaries, each with its breaker; see the module docstring."""

    def __init__(self, config: RedisConfig, *, clock: Callable[[], float], call_deadline: Callable[[], Deadline | None],
                 count: Count, breaker_failed: BreakerFailed) -> None:
        self.config = config
        self._clock = clock
        self._call_deadline = call_deadline  # the deadline of this thread's tier call, if any
        self._count = count
        self._breaker_failed = breaker_failed
        self._lock = threading.Lock()  # guards adding to shards and setting _cluster
        self.shards: dict[str, Shard] = {}
        self._cluster: RedisCluster[bytes] | None = None
        self._cluster_breaker = CircuitBreaker(config.breaker, clock=clock)  # for (re)building the slot map
        self._last_refresh = -_TOPOLOGY_REFRESH_S
        self._watchdog = _Watchdog()
        self._cluster_down = False  # said unreachable (WARNING) and not reached since
        if not config.cluster:
            client = self._guard_connect(redis.Redis.from_url(self.url, **self._client_kwargs()))
            self.shards["standalone"] = Shard("standalone", client, CircuitBreaker(config.breaker, clock=clock))

    # --- connection set-up --------------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        c = self.config
        kw: dict[str, Any] = dict(socket_timeout=c.socket_timeout_s, socket_connect_timeout=c.connect_timeout_s,
                                  retry=Retry(NoBackoff(), 0), health_check_interval=0, decode_responses=False,
                                  max_connections=c.max_connections)
        if c.username is not None:
            kw["username"] = c.username
        if c.password is not None:
            kw["password"] = c.password
        tls = {"ssl_ca_certs": c.tls_ca_file, "ssl_certfile": c.tls_cert_file, "ssl_keyfile": c.tls_key_file}
        kw.update({k: v for k, v in tls.items() if v is not None})  # the rediss:// scheme turns TLS on
        return kw

    def probe(self) -> str | None:
        """Why the server (or the cluster's seed node) does not answer a PING now, or None."""
        try:
            if self.config.cluster:  # not _cluster_client: that one logs, the caller says it
                kw = self._client_kwargs()
                kw.pop("max_connections")
                RedisCluster.from_url(self.url, require_full_coverage=False, **kw).close()
            else:
                self.shards["standalone"].client.ping()
        except (*SHARD_FAULTS, RedisClusterException) as exc:
            what = "Redis Cluster" if self.config.cluster else "Redis"
            return f"{what} at {self.config.url} unreachable: {exc}"
        return None

    def _guard_connect(self, client: redis.Redis[bytes]) -> redis.Redis[bytes]:
        """Put a new connection's set-up (AUTH, SELECT, ...) under the deadline of the call that opens it.

        redis-py calls ``redis_connect_func`` with the socket connected, before any handshake."""
        kwargs = client.connection_pool.connection_kwargs
        handshake = kwargs.get("redis_connect_func")  # RedisCluster's own, for its nodes
        watchdog, call_deadline, limit = self._watchdog, self._call_deadline, self.config.deadline_s

        def connect(conn: Any) -> None:
            deadline = call_deadline()
            watch = None if deadline is None else watchdog.watch(deadline.at, conn._sock)
            try:
                handshake(conn) if handshake is not None else conn.on_connect()
            finally:
                if watch is not None and watchdog.release(watch):
                    raise redis.TimeoutError(f"connection set-up exceeded deadline_s={limit}")

        kwargs["redis_connect_func"] = connect
        return client

    @property
    def url(self) -> str:
        """The server URL; ``rediss://`` (TLS) whenever a TLS file is configured."""
        c = self.config
        if (c.tls_ca_file or c.tls_cert_file or c.tls_key_file) and c.url.startswith("redis://"):
            return "rediss://" + c.url[len("redis://"):]
        return c.url

    def _cluster_client(self) -> RedisCluster[bytes] | None:
        """The cluster client, built on first use (and retried after a backoff if that failed)."""
        if self._cluster is not None:
            return self._cluster
        if not self._cluster_breaker.allow():
            return None
        try:
            kw = self._client_kwargs()
            kw.pop("max_connections")  # RedisCluster sizes its node pools itself
            cluster: RedisCluster[bytes] = RedisCluster.from_url(self.url, require_full_coverage=False, **kw)
        except (*SHARD_DOWN, redis.RedisError, RedisClusterException) as exc:
            self._cluster_breaker.record_failure()
            if not self._cluster_down:
                self._cluster_down = True
                log.warning("Redis Cluster at %s unreachable (%s): its chunks are misses until it answers",
                            self.config.url, exc)
            return None
        self._cluster_breaker.record_success()
        if self._cluster_down:
            self._cluster_down = False
            log.info("Redis Cluster at %s reachable again", self.config.url)
        with self._lock:
            if self._cluster is None:
                self._cluster = cluster
            else:
                cluster.close()
        return self._cluster

    def _refresh_topology(self) -> None:
        cluster = self._cluster
        now = self._clock()
        if cluster is None or now - self._last_refresh < _TOPOLOGY_REFRESH_S:
            return
        self._last_refresh = now
        try:
            cluster.nodes_manager.initialize()
        except (*SHARD_DOWN, redis.RedisError, RedisClusterException) as exc:
            log.info("Redis Cluster slot map refresh failed: %s", exc)

    def shard_for(self, rkey: bytes) -> Shard | None:
        if not self.config.cluster:
            return self.shards["standalone"]
        cluster = self._cluster_client()
        if cluster is None:
            return None
        try:
            node = cluster.get_node_from_key(rkey)
        except (redis.RedisError, RedisClusterException):
            return None  # slot not covered (mid-failover): a miss
        if node is None:
            return None
        shard = self.shards.get(node.name)
        if shard is None:
            with self._lock:
                shard = self.shards.get(node.name)
                if shard is None:
                    client = self._guard_connect(cluster.get_redis_connection(node))
                    shard = Shard(node.name, client, CircuitBreaker(self.config.breaker, clock=self._clock))
                    self.shards[node.name] = shard
        return shard

    # --- the one place requests go out -------------------------------------------------------
    def batch(self, deadline: Deadline, rkeys: Sequence[bytes], queue: Queue) -> list[Any]:
        """Run one pipelined command per key; a key's result is its reply, or None on failure.

        ``queue(pipe, i, rkeys[i])`` adds key i's command to its shard's pipeline.  The whole
        call ends by ``deadline`` (module docstring).
        """
        results: list[Any] = [None] * len(rkeys)
        groups: dict[str, tuple[Shard, list[int]]] = {}
        unrouted = 0
        for i, rkey in enumerate(rkeys):
            shard = self.shard_for(rkey)
            if shard is None:
                unrouted += 1
                continue
            groups.setdefault(shard.name, (shard, []))[1].append(i)
        if unrouted:
            self._count(errors=unrouted)

        # Scatter, then gather: send every shard's pipeline before reading any reply, so all
        # shards work at once from one thread (threads per shard measured slower: GIL churn).
        sent: list[tuple[Shard, list[int], Any, Any, int]] = []  # (shard, idxs, pipeline, connection, watch)
        try:
            for shard, idxs in groups.values():
                if not shard.breaker.allow():
                    self._count(short_circuited=len(idxs))
                    continue
                pipe = shard.client.pipeline(transaction=False)
                for i in idxs:
                    queue(pipe, i, rkeys[i])
                conn = watch = None
                try:
                    conn = shard.client.connection_pool.get_connection()
                    watch = self._watchdog.watch(deadline.at, conn._sock)
                    if deadline.expired:  # connecting took the whole budget
                        raise redis.TimeoutError(f"no time left of deadline_s={self.config.deadline_s}")
                    conn.send_packed_command(conn.pack_commands([args for args, _ in pipe.command_stack]))
                except BaseException as exc:
                    self._shard_failed(shard, len(idxs), conn, self._deadline_error(exc, watch))
                    if not isinstance(exc, SHARD_FAULTS):  # Ctrl-C or a bug: not this shard's fault
                        for other_shard, other_idxs, _, other_conn, _ in sent:  # do not leak their connections
                            self._shard_failed(other_shard, len(other_idxs), other_conn, exc)
                        raise
                    continue
                assert watch is not None
                sent.append((shard, idxs, pipe, conn, watch))
            for n, (shard, idxs, pipe, conn, watch) in enumerate(sent):
                try:
                    replies = [_reply(pipe, conn, args[0], options) for args, options in pipe.command_stack]
                    if self._watchdog.release(watch):  # shut down just after the last reply
                        raise redis.TimeoutError(f"call exceeded deadline_s={self.config.deadline_s}")
                except BaseException as exc:
                    self._shard_failed(shard, len(idxs), conn, self._deadline_error(exc, watch))
                    if not isinstance(exc, SHARD_FAULTS):
                        for other_shard, other_idxs, _, other_conn, _ in sent[n + 1:]:  # do not leak them
                            self._shard_failed(other_shard, len(other_idxs), other_conn, exc)
                        raise
                    continue
                shard.client.connection_pool.release(conn)
                self._shard_answered(shard)
                moved = 0
                for i, reply in zip(idxs, replies, strict=True):
                    if isinstance(reply, redis.ResponseError) and str(reply).startswith(("MOVED", "ASK")):
                        moved += 1
                        continue
                    results[i] = reply
                if moved:
                    self._count(errors=moved)
                    self._refresh_topology()
        finally:
            for *_, watch in sent:
                self._watchdog.release(watch)
        return results

    def _deadline_error(self, exc: BaseException, watch: int | None) -> BaseException:
        """``exc``, or a TimeoutError naming the deadline when the watchdog shut the socket down
        (which stops watching it)."""
        if watch is not None and self._watchdog.release(watch) and isinstance(exc, SHARD_FAULTS):
            return redis.TimeoutError(f"call exceeded deadline_s={self.config.deadline_s} ({exc})")
        return exc

    def _shard_answered(self, shard: Shard) -> None:
        shard.breaker.record_success()
        if shard.down:
            shard.down = False
            log.info("Redis %s answers again", self._where(shard))

    def _where(self, shard: Shard) -> str:
        return f"shard {shard.name}" if self.config.cluster else f"server {self.config.url}"

    def _shard_failed(self, shard: Shard, n: int, conn: Any, exc: BaseException) -> None:
        """A request to ``shard`` failed: drop its connection; a server fault also feeds the
        shard's breaker and counts ``n`` errors.  Anything else (KeyboardInterrupt, a bug) is no
        fault of the shard: the caller re-raises it, the breaker and counters are left alone."""
        if conn is not None:
            conn.disconnect()  # replies may be half read: never reuse this connection
            shard.client.connection_pool.release(conn)
        if not isinstance(exc, SHARD_FAULTS):
            return
        self._breaker_failed(shard.breaker, errors=n)
        if not shard.down:
            shard.down = True  # said once per outage; the rest at DEBUG
            log.warning("Redis %s unreachable (%s): its chunks are misses until it answers",
                        self._where(shard), exc)
        else:
            log.debug("Redis shard %s failed: %s", shard.name, exc)
        if self.config.cluster:
            self._refresh_topology()

    def scan(self, match: bytes) -> Iterator[bytes]:
        """Every key matching ``match`` on the server(s) (``SCAN``); shards down are skipped."""
        if self.config.cluster:
            cluster = self._cluster_client()
            clients = [] if cluster is None else [cluster.get_redis_connection(n) for n in cluster.get_primaries()]
        else:
            clients = [self.shards["standalone"].client]
        for client in clients:
            try:
                found = list(client.scan_iter(match=match, count=1000))
            except (*SHARD_DOWN, redis.RedisError) as exc:
                self._count(errors=1)
                log.info("Redis SCAN failed: %s", exc)
                continue
            yield from found

    def close(self) -> None:
        self._watchdog.close()
        for shard in self.shards.values():
            if not self.config.cluster:
                shard.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Each shard's breaker by ``host:port`` (``"standalone"`` for one server)."""
        return {name: s.breaker for name, s in self.shards.items()}


class _Watchdog:
    """Shuts down the sockets of calls past their deadline, from one thread per tier.

    ``shutdown`` is the one way to wake a thread blocked in ``recv``/``sendall`` on a socket from
    another thread: the read returns end-of-file, the write fails, and redis-py raises a
    ``ConnectionError`` in the caller.  The thread starts on the first ``watch`` and sleeps
    while nothing is watched; it is a daemon, so a tier never closed does not hold the process.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []  # (deadline, token), soonest first
        self._socks: dict[int, socket.socket] = {}  # token -> socket still watched
        self._fired: set[int] = set()  # tokens whose socket was shut down, not yet released
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, deadline: float, sock: socket.socket | None) -> int:
        """Watch ``sock`` until ``release``; shut it down at ``deadline`` (``time.monotonic``)."""
        with self._cv:
            token = next(self._tokens)
            if sock is None:  # not connected: nothing can block on it
                return token
            self._socks[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvtier-redis-deadline", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == token:  # sooner than what the thread waits for
                self._cv.notify()
            return token

    def release(self, token: int) -> bool:
        """Stop watching; True when the deadline had passed and the socket was shut down."""
        with self._cv:
            self._socks.pop(token, None)  # its heap entry is skipped when it surfaces
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def close(self) -> None:
        """Stop the thread (calls still watched are left to their socket timeouts)."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)  # released before its deadline
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                sock = self._socks.pop(token)
                self._fired.add(token)
                with contextlib.suppress(OSError):  # closed meanwhile
                    sock.shutdown(socket.SHUT_RDWR)


def _reply(pipe: Any, conn: Any, command: Any, options: dict[str, Any]) -> Any:
    """One pipelined reply, with redis-py's response callbacks; an error reply is returned, not raised."""
    try:
        return pipe.parse_response(conn, command, **options)
    except redis.ResponseError as exc:
        return exc
