"""The ``node`` tier against a real ``kvtier serve``: conformance, two engine processes sharing the
pool, and the service killed, frozen and restarted under a client (misses within the deadline)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.config import load_config
from kvtier.config_node import NodeConfig
from kvtier.hierarchy import ContextMemory
from kvtier.layout import KVLayout
from kvtier.testing import TierConformance
from kvtier.tiers.node import NodeTier
from tests.conftest import make_keys, make_payloads
from tests.node.serving import ROOT, Service, ThreadService, wait_for

DEADLINE_S = 0.5
SLACK_S = 1.0  # scheduling on a loaded 2-core CI box: a stall would be a socket timeout or for ever


def node_tier(layout: KVLayout, path: Path, **config: float) -> NodeTier:
    return NodeTier(layout, NodeConfig(url=f"unix://{path}", **{"deadline_s": DEADLINE_S, "retry_s": 0.05, **config}))


class TestNodeTier(TierConformance):
    @pytest.fixture
    def tier(self, layout: KVLayout, sock_path: Path) -> Iterator[NodeTier]:
        service = ThreadService(sock_path, 16 * layout.chunk_bytes)
        t = node_tier(layout, sock_path, deadline_s=2.0)  # a thread service shares this process's GIL
        yield t
        t.close()
        service.stop()


def test_the_pool_is_sized_by_the_service(small_layout: KVLayout, sock_path: Path) -> None:
    service = ThreadService(sock_path, 10 * small_layout.chunk_bytes + 5)
    try:
        tier = node_tier(small_layout, sock_path, deadline_s=2.0)
        assert tier.capacity_bytes == 10 * small_layout.chunk_bytes
        tier.close()
    finally:
        service.stop()


WRITER = """
import sys
from kvtier.config_node import NodeConfig
from kvtier.layout import KVLayout
from kvtier.tiers.node import NodeTier
from tests.conftest import make_keys, make_payloads
layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
tier = NodeTier(layout, NodeConfig(url="unix://" + sys.argv[1], deadline_s=5.0))
n = int(sys.argv[2])
keys, payloads = make_keys(layout, n, seed=5), make_payloads(layout, n, seed=5)
if sys.argv[3] == "put":
    assert tier.put_many(keys, payloads) == [True] * n
else:
    import numpy as np
    outs = [np.zeros(layout.chunk_bytes, np.uint8) for _ in keys]
    assert tier.get_many_into(keys, outs) == [True] * n
    assert all((o == p).all() for o, p in zip(outs, payloads))
tier.close()
print("ok", sys.argv[3])
"""


def run_client(path: Path, n: int, op: str) -> None:
    out = subprocess.run([sys.executable, "-c", WRITER, str(path), str(n), op], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"ok {op}", out.stderr


def test_a_chunk_put_by_one_process_is_read_by_another(small_layout: KVLayout, sock_path: Path) -> None:
    service = Service(sock_path).start()
    try:
        run_client(sock_path, 8, "put")  # process A stores, exits
        run_client(sock_path, 8, "get")  # process B reads the same bytes from the shared pool
        tier = node_tier(small_layout, sock_path)  # and a third, this one
        outs = [np.zeros(small_layout.chunk_bytes, np.uint8) for _ in range(8)]
        assert tier.get_many_into(make_keys(small_layout, 8, seed=5), outs) == [True] * 8
        for out, payload in zip(outs, make_payloads(small_layout, 8, seed=5), strict=True):
            np.testing.assert_array_equal(out, payload)
        tier.close()
    finally:
        service.stop()


ENGINE = """
import sys
from kvtier.config import load_config
from kvtier.hierarchy import ContextMemory
from kvtier.layout import KVLayout
layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
config = load_config(env={"KVTIER_TIERS": "node,disk", "KVTIER_NODE__URL": "unix://" + sys.argv[1],
                          "KVTIER_DISK__PATH": sys.argv[2], "KVTIER_CHUNK_TOKENS": "4"})
memory = ContextMemory.open(layout, config)
import numpy as np
tokens = np.arange(40)
keys = memory.keys_for(tokens)
payloads = [np.full(layout.chunk_bytes, i, np.uint8) for i in range(len(keys))]
memory.store(keys, payloads)
memory.close()
print("stored", len(keys))
"""


def test_an_engine_store_is_a_dram_hit_in_another_engine(small_layout: KVLayout, sock_path: Path,
                                                         tmp_path: Path) -> None:
    service = Service(sock_path).start()
    try:
        out = subprocess.run([sys.executable, "-c", ENGINE, str(sock_path), str(tmp_path / "a")],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "stored 10", out.stderr
        config = load_config(env={"KVTIER_TIERS": "node,disk", "KVTIER_NODE__URL": f"unix://{sock_path}",
                                  "KVTIER_DISK__PATH": str(tmp_path / "b"), "KVTIER_CHUNK_TOKENS": "4"})
        memory = ContextMemory.open(small_layout, config)  # its own disk: a hit can only come from the node
        keys = memory.keys_for(np.arange(40))
        hit = memory.lookup(keys)
        assert hit.tiers == (0,) * 10  # every chunk in the node's DRAM
        outs = [np.zeros(small_layout.chunk_bytes, np.uint8) for _ in keys]
        assert memory.load(keys, outs) == 10
        assert all((o == i).all() for i, o in enumerate(outs))
        memory.close()
    finally:
        service.stop()


def timed(call: object) -> tuple[object, float]:
    start = time.monotonic()
    value = call()  # type: ignore[operator]
    return value, time.monotonic() - start


def test_a_killed_service_is_misses_within_the_deadline_then_back(small_layout: KVLayout, sock_path: Path) -> None:
    service = Service(sock_path).start()
    tier = node_tier(small_layout, sock_path)
    keys, payloads = make_keys(small_layout, 4), make_payloads(small_layout, 4)
    out = np.zeros(small_layout.chunk_bytes, np.uint8)
    try:
        assert tier.put_many(keys, payloads) == [True] * 4
        service.signal(signal.SIGKILL)
        service.proc.wait()  # type: ignore[union-attr]
        for call in (lambda: tier.contains_many(keys), lambda: tier.get_into(keys[0], out),
                     lambda: tier.put(keys[0], payloads[0]), lambda: tier.delete(keys[1])):
            value, took = timed(call)
            assert value in (False, [False] * 4) and took < DEADLINE_S + SLACK_S, (value, took)
        assert tier.stats.errors + tier.stats.extra["short_circuited"] > 0
        service = Service(sock_path).start()  # the stale socket is replaced; a new, empty pool
        wait_for(lambda: tier.put(keys[0], payloads[0]), what="the client to reconnect")
        assert tier.get_into(keys[0], out) and (out == payloads[0]).all()
        assert tier.stats.extra["reconnects"] == 1
    finally:
        tier.close()
        service.stop()


def test_a_frozen_service_costs_one_deadline(small_layout: KVLayout, sock_path: Path) -> None:
    service = Service(sock_path).start()
    tier = node_tier(small_layout, sock_path)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    try:
        assert tier.put_many(keys, payloads) == [True, True]
        service.signal(signal.SIGSTOP)
        out = np.zeros(small_layout.chunk_bytes, np.uint8)
        found, took = timed(lambda: tier.get_into(keys[0], out))
        assert found is False and DEADLINE_S * 0.9 < took < DEADLINE_S + SLACK_S, took
        _, took = timed(lambda: tier.contains(keys[0]))  # the connection is dropped: at once
        assert took < DEADLINE_S
        service.signal(signal.SIGCONT)
        wait_for(lambda: tier.get_into(keys[0], out), what="the client to reconnect")
        assert (out == payloads[0]).all()  # the pool outlived the connection
    finally:
        tier.close()
        service.stop()


def test_no_service_at_start_is_misses_then_connects(small_layout: KVLayout, sock_path: Path) -> None:
    (tier, took) = timed(lambda: node_tier(small_layout, sock_path))
    assert took < DEADLINE_S + SLACK_S
    keys, payloads = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    assert isinstance(tier, NodeTier) and tier.put_many(keys, payloads) == [False]
    service = Service(sock_path).start()
    try:
        wait_for(lambda: tier.put(keys[0], payloads[0]), what="the client to connect")
        assert tier.contains(keys[0])
    finally:
        tier.close()
        service.stop()
