"""``kvtier serve`` as a process, against hostile and dying clients: a client SIGKILLed mid-copy
publishes nothing, garbage closes only its own connection, a mismatched layout is refused in one
line, a second service on the socket fails, a stale socket is replaced."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.errors import TierUnavailableError
from kvtier.layout import KVLayout
from kvtier.tiers.node_wire import NodeConnection, NodeRefused, encode, keys_hex
from tests.conftest import make_keys, make_payloads
from tests.node.serving import ROOT, Service, ask, wait_for
from tests.tiers.test_node import node_tier


@pytest.fixture
def service(sock_path: Path) -> Iterator[Service]:
    started = Service(sock_path).start()
    yield started
    started.stop()


HALF_WRITER = """
import sys, time
from kvtier.layout import KVLayout
from kvtier.tiers.node_wire import NodeConnection, keys_hex
from tests.conftest import make_keys
layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
conn = NodeConnection(__import__("pathlib").Path(sys.argv[1]), layout, 5.0)
keys = make_keys(layout, 3, seed=9)
slots = conn.request({"op": "reserve", "keys": keys_hex(keys)}, 5.0)["slots"]
for slot in slots:
    conn.slot(slot)[: layout.chunk_bytes // 2] = 0xEE  # half a chunk, then killed
print("reserved", *slots, flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_copy_publishes_nothing(small_layout: KVLayout, service: Service) -> None:
    child = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(service.path)], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("reserved"), line
        keys = make_keys(small_layout, 3, seed=9)
        tier = node_tier(small_layout, service.path)
        assert ask(service.path, {"op": "stats"})["reserved"] == 3
        assert tier.contains_many(keys) == [False] * 3  # reserved: invisible
        child.send_signal(signal.SIGKILL)
        child.wait()
        stats = wait_for(lambda: (s := ask(service.path, {"op": "stats"}))["reserved"] == 0 and s,
                         what="the service to reclaim the dead client's slots")
        assert stats["reclaimed_reservations"] == 3 and stats["published"] == 0
        assert tier.contains_many(keys) == [False] * 3
        payloads = make_payloads(small_layout, 3)
        assert tier.put_many(keys, payloads) == [True] * 3  # the slots are reused, whole chunks this time
        outs = [np.zeros(small_layout.chunk_bytes, np.uint8) for _ in keys]
        assert tier.get_many_into(keys, outs) == [True] * 3
        assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))
        tier.close()
        assert "reclaimed 3 reservation(s)" in service.text()
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x02[]",
                                     b'\x00\x00\x00\x10{"op":"acquire"}', b'\x00\x00\x00\x0e{"op":"stats"}'[:9]])
def test_garbage_closes_that_connection_only(small_layout: KVLayout, service: Service, garbage: bytes) -> None:
    tier = node_tier(small_layout, service.path)
    keys, payloads = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.settimeout(5)
        bad.connect(str(service.path))
        bad.sendall(garbage)
        if len(garbage) > 9:  # a whole bad frame: closed at once (a cut one waits for more bytes)
            assert bad.recv(100) == b""
            wait_for(lambda: "closing its connection" in service.text(), what="the error in the service's log")
    assert tier.put_many(keys, payloads) == [True]  # the others are served
    assert tier.contains(keys[0])
    tier.close()


def test_a_mismatched_layout_is_refused_in_one_line(small_layout: KVLayout, service: Service) -> None:
    first = node_tier(small_layout, service.path)
    other = KVLayout(model="test/other", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                     tokens_per_chunk=4)
    with pytest.raises(NodeRefused, match="layout mismatch: this kvtier serve holds chunks of test/tiny") as info:
        NodeConnection(service.path, other, 2.0)
    assert "\n" not in str(info.value)
    refused = node_tier(other, service.path)  # the tier: misses, counted, never an exception
    assert refused.contains_many(make_keys(other, 2)) == [False, False]
    assert refused.stats.extra["short_circuited"] == 2
    assert "layout mismatch" in service.text()
    first.close()
    refused.close()


def test_a_second_service_on_the_socket_fails(service: Service) -> None:
    second = Service(service.path).start(wait=False)
    assert second.proc is not None and second.proc.wait(30) == 2
    assert "another kvtier serve is serving" in second.text() and second.text().count("\n") == 1
    assert ask(service.path, {"op": "stats"})["ok"]  # the first one still serves


def test_the_socket_is_private_and_goes_at_sigterm(service: Service) -> None:
    assert stat.S_IMODE(os.stat(service.path).st_mode) == 0o600
    service.signal(signal.SIGTERM)
    assert service.proc is not None and service.proc.wait(10) == 0
    assert not service.path.exists()


def test_a_stale_socket_is_replaced(small_layout: KVLayout, sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nothing listens: a service that died
    service = Service(sock_path).start()
    try:
        assert "removed the stale socket" in service.text()
        tier = node_tier(small_layout, sock_path)
        assert tier.put_many(make_keys(small_layout, 1), make_payloads(small_layout, 1)) == [True]
        tier.close()
    finally:
        service.stop()


def test_a_file_that_is_no_socket_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("mine")
    service = Service(sock_path).start(wait=False)
    assert service.proc is not None and service.proc.wait(30) == 2
    assert "exists and is not a socket" in service.text() and sock_path.read_text() == "mine"


def test_requests_before_hello_and_foreign_slots_are_refused(small_layout: KVLayout, service: Service) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(service.path))
        raw.sendall(encode({"op": "lookup", "keys": keys_hex(make_keys(small_layout, 1))}))
        assert raw.recv(100) == b""
    conn = NodeConnection(service.path, small_layout, 2.0)
    with pytest.raises(TierUnavailableError):
        conn.request({"op": "commit", "slots": [0]}, 2.0)  # never reserved: the connection is closed
    conn.close()
    assert ask(service.path, {"op": "stats"})["protocol_errors"] >= 2
