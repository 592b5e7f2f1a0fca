"""RedisTier against real redis-server processes: standalone and a 3-shard Cluster, with a password."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from bench.harness.servers import RedisClusterServers, RedisServer
from kvtier.codec import encode_chunk
from kvtier.config import BreakerConfig, RedisConfig
from kvtier.layout import KVLayout
from kvtier.testing import TierConformance
from kvtier.tiers.breaker import BreakerMode
from kvtier.tiers.redis import RedisTier
from tests.conftest import FORGERIES, forgery, make_keys, make_payloads
from tests.tiers.servers import TEST_BREAKER, redis_cluster, redis_config, redis_standalone  # noqa: F401

Servers = RedisServer | RedisClusterServers


def _raw(server: Servers) -> redis.Redis | redis.RedisCluster:
    if isinstance(server, RedisClusterServers):
        return redis.RedisCluster.from_url(server.url, password=server.password)
    return redis.Redis.from_url(server.url, password=server.password)


def _buf(layout: KVLayout) -> np.ndarray:
    return np.zeros(layout.chunk_bytes, dtype=np.uint8)


class TestRedisStandalone(TierConformance):
    @pytest.fixture
    def server(self, redis_standalone: RedisServer) -> Servers:  # noqa: F811
        return redis_standalone

    @pytest.fixture
    def tier(self, layout: KVLayout, server: Servers) -> Iterator[RedisTier]:
        t = RedisTier(layout, redis_config(server))
        yield t
        t.close()

    def test_value_is_a_self_describing_chunk_under_the_documented_key(
            self, tier: RedisTier, layout: KVLayout, server: Servers) -> None:
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        assert tier.put(key, payload)
        rkey = f"{tier.config.key_prefix}:{layout.fingerprint:016x}:{key.hex()}".encode()
        assert _raw(server).get(rkey) == encode_chunk(key, layout.fingerprint, payload)

    @pytest.mark.parametrize("damage", ["bitflip", "truncate", "foreign_layout", "not_a_chunk", *FORGERIES])
    def test_bad_value_is_a_miss_deleted_and_counted(self, tier: RedisTier, layout: KVLayout, server: Servers,
                                                    damage: str) -> None:
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        good = encode_chunk(key, layout.fingerprint, payload)
        bad = {"bitflip": good[:-1] + bytes([good[-1] ^ 1]), "truncate": good[:-10],
               "foreign_layout": encode_chunk(key, layout.fingerprint ^ 1, payload),
               "not_a_chunk": b"hello"}.get(damage) or forgery(damage, key, layout, payload)
        raw = _raw(server)
        raw.set(tier.redis_key(key), bad)
        out = np.full(layout.chunk_bytes, 7, dtype=np.uint8)
        assert not tier.get_into(key, out)
        assert (out == 7).all()
        assert tier.stats.corrupt == 1
        assert raw.exists(tier.redis_key(key)) == 0

    def test_ttl_is_set(self, layout: KVLayout, server: Servers) -> None:
        tier = RedisTier(layout, redis_config(server, ttl_s=60))
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        assert tier.put(key, payload)
        assert 0 < _raw(server).ttl(tier.redis_key(key)) <= 60
        tier.close()

    def test_prefixes_and_layouts_do_not_see_each_other(self, layout: KVLayout, server: Servers) -> None:
        a = RedisTier(layout, redis_config(server))
        b = RedisTier(layout, redis_config(server))  # another deployment: another prefix
        keys, payloads = make_keys(layout, 2), make_payloads(layout, 2)
        a.put_many(keys, payloads)
        assert b.contains_many(keys) == [False, False]
        assert not set(b.keys()) & set(keys)
        a.close()
        b.close()

    def test_wrong_password_is_a_miss_not_an_exception(self, layout: KVLayout, server: Servers) -> None:
        tier = RedisTier(layout, redis_config(server, password="wrong"))
        (key,), (payload,) = make_keys(layout, 1), make_payloads(layout, 1)
        assert not tier.put(key, payload)
        assert not tier.get_into(key, _buf(layout))
        assert tier.contains_many([key]) == [False]
        assert tier.stats.errors + tier.stats.extra["short_circuited"] == 3
        tier.close()


class TestRedisCluster(TestRedisStandalone):
    @pytest.fixture
    def server(self, redis_cluster: RedisClusterServers) -> Servers:  # noqa: F811
        return redis_cluster

    def test_chunks_spread_over_every_shard(self, tier: RedisTier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 48), make_payloads(layout, 48)
        assert all(tier.put_many(keys, payloads))
        assert len(tier.breakers()) == 3  # every shard was written to
        assert set(tier.keys()) == set(keys)
        other = RedisTier(layout, tier.config)  # another process, same deployment: finds them by SCAN
        assert set(other.scan_keys()) == set(keys) and set(other.keys()) == set()
        other.close()


def test_acl_user_is_confined_to_its_prefix(redis_standalone: RedisServer, small_layout: KVLayout) -> None:  # noqa: F811
    raw = _raw(redis_standalone)
    raw.execute_command("ACL", "SETUSER", "tenant-a", "on", ">secret-a", "~tenant-a:*",  # as in docs/sharing.md
                        "+get", "+set", "+exists", "+del", "+scan", "+ping")
    ok = RedisTier(small_layout, redis_config(redis_standalone, username="tenant-a", password="secret-a",
                                              key_prefix="tenant-a"))
    denied = RedisTier(small_layout, redis_config(redis_standalone, username="tenant-a", password="secret-a",
                                                  key_prefix="tenant-b"))
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    assert ok.put(key, payload) and ok.get_into(key, _buf(small_layout))
    assert ok.contains(key) and list(ok.keys()) == [key] and ok.delete(key)
    assert not denied.put(key, payload)  # NOPERM: refused, never raised
    assert not denied.get_into(key, _buf(small_layout))
    ok.close()
    denied.close()


def test_tls_options_pass_through(small_layout: KVLayout) -> None:
    with RedisServer(tls=True) as server:
        c = server.certs
        tier = RedisTier(small_layout, redis_config(server, tls_ca_file=str(c["ca"]), tls_cert_file=str(c["cert"]),
                                                    tls_key_file=str(c["key"])))
        (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
        out = _buf(small_layout)
        assert tier.put(key, payload) and tier.get_into(key, out)
        np.testing.assert_array_equal(out, payload)
        no_client_cert = RedisTier(small_layout, redis_config(server, tls_ca_file=str(c["ca"])))
        assert not no_client_cert.put(key, payload)  # the server demands a client certificate: a miss
        assert no_client_cert.stats.errors == 1
        wrong_ca = RedisTier(small_layout, redis_config(server, tls_ca_file=str(c["cert"]),
                                                        tls_cert_file=str(c["cert"]), tls_key_file=str(c["key"])))
        assert not wrong_ca.get_into(key, out)  # the server's certificate does not verify
        for t in (tier, no_client_cert, wrong_ca):
            t.close()


def _wait_for(predicate: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_standalone_down_is_misses_then_recovers(small_layout: KVLayout) -> None:
    with RedisServer() as server:
        tier = RedisTier(small_layout, redis_config(server))
        keys, payloads = make_keys(small_layout, 4), make_payloads(small_layout, 4)
        assert all(tier.put_many(keys, payloads))
        server.kill()
        outs = [_buf(small_layout) for _ in keys]
        for _ in range(5):  # never raises; the breaker opens after 2 failures
            assert tier.get_many_into(keys, outs) == [False] * 4
            assert tier.contains_many(keys) == [False] * 4
            assert tier.put_many(keys, payloads) == [False] * 4
        assert tier.breakers()["standalone"].mode is not BreakerMode.CLOSED
        assert tier.stats.errors >= 8 and tier.stats.extra["short_circuited"] > 0
        t0 = time.monotonic()
        tier.get_many_into(keys, outs)  # open breaker: answered at once, no socket wait
        assert time.monotonic() - t0 < 0.1
        server.start()  # empty (no persistence): store again, and hits resume by themselves
        assert _wait_for(lambda: tier.put_many(keys, payloads) == [True] * 4)
        assert tier.get_many_into(keys, outs) == [True] * 4
        for o, p in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(o, p)
        assert tier.breakers()["standalone"].mode is BreakerMode.CLOSED
        tier.close()


def test_cluster_shard_killed_mid_run_then_restarted(small_layout: KVLayout) -> None:
    with RedisClusterServers(3) as cluster:
        tier = RedisTier(small_layout, redis_config(cluster))
        keys, payloads = make_keys(small_layout, 60, seed=5), make_payloads(small_layout, 60, seed=5)
        assert all(tier.put_many(keys, payloads))
        victim = cluster.nodes[1]
        on_victim = [tier._redis.shard_for(tier.redis_key(k)).name == f"127.0.0.1:{victim.port}" for k in keys]  # type: ignore[union-attr]
        assert 0 < sum(on_victim) < len(keys)
        cluster.kill(1)
        outs = [_buf(small_layout) for _ in keys]
        for _ in range(5):  # zero exceptions; the other shards keep serving
            got = tier.get_many_into(keys, outs)
            assert got == [not v for v in on_victim]
            assert tier.contains_many(keys) == [not v for v in on_victim]
        missed = sum(on_victim) * 5
        assert tier.stats.errors + tier.stats.extra["short_circuited"] == 2 * missed
        assert tier.stats.extra["breaker_trips"] >= 1
        cluster.restart(1)  # comes back empty on the same port, owning the same slots
        assert _wait_for(lambda: all(tier.put_many(keys, payloads)))
        assert tier.get_many_into(keys, outs) == [True] * len(keys)
        for o, p in zip(outs, payloads, strict=True):
            np.testing.assert_array_equal(o, p)
        tier.close()


def test_hung_server_costs_two_timeouts_then_answers_at_once(small_layout: KVLayout) -> None:
    with RedisServer() as server:
        tier = RedisTier(small_layout, redis_config(server, socket_timeout_s=0.3))
        keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
        assert all(tier.put_many(keys, payloads))
        server.pause()
        try:
            waits = []
            for _ in range(6):
                t0 = time.monotonic()
                assert tier.contains_many(keys) == [False] * 3
                waits.append(time.monotonic() - t0)
            assert all(w >= 0.25 for w in waits[:2])  # failure_threshold=2 socket timeouts...
            assert all(w < 0.05 for w in waits[2:])  # ...then the open breaker answers at once
        finally:
            server.resume()
        assert _wait_for(lambda: tier.contains_many(keys) == [True] * 3)  # recovers by itself
        tier.close()


def test_capacity_is_this_process_budget(small_layout: KVLayout, redis_standalone: RedisServer) -> None:  # noqa: F811
    tier = RedisTier(small_layout, redis_config(redis_standalone, capacity=2 * small_layout.chunk_bytes))
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    assert tier.put_many(keys, payloads) == [True, True, False]
    assert tier.put(keys[0], payloads[0])  # an overwrite needs no room
    assert tier.contains_many(keys) == [True, True, False]
    assert tier.delete(keys[0]) and tier.put(keys[2], payloads[2])
    tier.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, AttributeError])
def test_ctrl_c_or_a_bug_while_sending_is_raised_not_a_shard_failure(
        small_layout: KVLayout, redis_standalone: RedisServer, exc: type[BaseException]) -> None:  # noqa: F811
    tier = RedisTier(small_layout, redis_config(redis_standalone))
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    shard = tier._redis.shards["standalone"]
    pool = shard.client.connection_pool
    real = pool.get_connection

    def interrupted(*args: object, **kwargs: object) -> object:  # the next send raises, once
        conn = real(*args, **kwargs)  # type: ignore[arg-type]

        def send(*_a: object, **_k: object) -> None:
            del conn.send_packed_command  # back to the real method
            raise exc("while sending")

        conn.send_packed_command = send
        pool.get_connection = real  # type: ignore[method-assign]
        return conn

    pool.get_connection = interrupted  # type: ignore[method-assign]
    with pytest.raises(exc, match="while sending"):
        tier.put_many(keys, payloads)
    assert tier.stats.errors == 0 and shard.breaker.state.failures == 0
    assert tier.put_many(keys, payloads) == [True, True]  # the dropped connection was not reused half-sent
    out = _buf(small_layout)
    assert tier.get_into(keys[1], out) and (out == payloads[1]).all()
    tier.close()


class _SlowLoris:
    """A Redis look-alike on a free loopback port that answers one byte at a time (every 20 ms:
    a 1 MB reply would take hours), for at most a minute.  ``fast_setup``: redis-py's
    connection set-up (CLIENT SETINFO) is answered at once, only the commands trickle."""

    def __init__(self, *, fast_setup: bool) -> None:
        self.fast_setup = fast_setup
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if self.fast_setup and b"SETINFO" in data:
                    conn.sendall(b"+OK\r\n" * data.count(b"SETINFO"))
                    continue
                reply = b"$1000000\r\n"
                for i in range(50 * 60):  # at most a minute, then the test fails anyway
                    if self._stop.is_set():
                        return
                    try:
                        conn.sendall(reply[i:i + 1] or b"x")
                    except OSError:
                        return  # the client gave up
                    time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()


@pytest.mark.parametrize("fast_setup", [True, False], ids=["trickled-reply", "trickled-connection-setup"])
def test_a_trickling_server_costs_one_deadline_per_call_then_the_breaker_opens(small_layout: KVLayout,
                                                                               fast_setup: bool) -> None:
    server = _SlowLoris(fast_setup=fast_setup)
    try:
        tier = RedisTier(small_layout, RedisConfig(url=server.url, key_prefix="loris", deadline_s=0.5,
                                                   socket_timeout_s=0.5, breaker=TEST_BREAKER))
        keys = make_keys(small_layout, 2)
        outs = [_buf(small_layout) for _ in keys]
        for _ in range(2):  # failure_threshold=2 calls, each a miss within its deadline
            t0 = time.monotonic()
            assert tier.get_many_into(keys, outs) == [False, False]
            assert time.monotonic() - t0 < 0.5 + 2.0  # generous slack; without a deadline: never
        assert tier.stats.errors == 4
        assert tier.breakers()["standalone"].mode is not BreakerMode.CLOSED
        t0 = time.monotonic()
        assert tier.get_many_into(keys, outs) == [False, False]  # open breaker: at once
        assert time.monotonic() - t0 < 0.5 and tier.stats.extra["short_circuited"] == 2
        tier.close()
    finally:
        server.close()


def test_refused_writes_are_counted_and_logged(small_layout: KVLayout, redis_standalone: RedisServer,  # noqa: F811
                                               caplog: pytest.LogCaptureFixture) -> None:
    raw = _raw(redis_standalone)
    raw.execute_command("ACL", "SETUSER", "reader", "on", ">secret-r", "~*", "+@read", "+ping")
    tier = RedisTier(small_layout, redis_config(redis_standalone, username="reader", password="secret-r"))
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.redis"):
        assert tier.put_many(keys, payloads) == [False] * 3  # NOPERM on every SET
        assert tier.put(keys[0], payloads[0]) is False
    assert tier.stats.errors == 4 and tier.stats.extra["refused_writes"] == 4
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "NoPermissionError" in refused[0].getMessage()  # rate-limited: one line
    assert tier.breakers()["standalone"].mode is BreakerMode.CLOSED  # the server is up: no breaker failure
    assert tier.contains_many(keys) == [False] * 3  # reads still work
    tier.close()


def test_out_of_memory_writes_are_counted(small_layout: KVLayout) -> None:
    with RedisServer() as server:
        raw = _raw(server)
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", 1)
        tier = RedisTier(small_layout, redis_config(server))
        keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
        assert tier.put_many(keys, payloads) == [False, False]  # -OOM
        assert tier.stats.errors == 2 and tier.stats.extra["refused_writes"] == 2
        tier.close()


def test_an_unreachable_server_is_said_once_at_warning(small_layout: KVLayout,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as spare:  # a free port nobody listens on once closed
        url = f"redis://127.0.0.1:{spare.getsockname()[1]}/0"
    tier = RedisTier(small_layout, RedisConfig(url=url, breaker=BreakerConfig(failure_threshold=5)))
    keys = make_keys(small_layout, 1)
    with caplog.at_level(logging.DEBUG, logger="kvtier.tiers.redis"):
        for _ in range(3):
            assert tier.contains_many(keys) == [False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage() and url in warnings[0].getMessage()
    tier.close()
