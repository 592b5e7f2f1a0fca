"""G4 throughput: the Redis/Valkey and Mooncake tiers vs their raw clients, in the same run.

For 2 MiB and 32 MiB chunks (Llama-3.1-8B KV: 16 and 256 tokens a chunk), each engine moves
``--total`` bytes per round, in batches of about ``--batch`` bytes, through

* kvtier: ``put_many`` / ``get_many_into`` (chunk format with checksums, validation, breaker);
* the raw client doing the same work with the same bytes: redis-py pipelined ``SET``/``GET``
  (``RedisCluster.pipeline()`` in cluster mode), or Mooncake ``batch_put_from`` /
  ``batch_get_into`` from and into registered buffers (Mooncake's fastest path).

Rounds alternate raw and kvtier, each going first in every other round (``--repeat``; medians
reported), so a noisy machine moves both;
every round writes fresh keys and deletes them afterwards (untimed).  ``ratio`` = kvtier / raw
throughput (target >= 0.8); ``paired`` = the median over rounds of raw time / kvtier time in the
same round, steadier when other work on the machine comes and goes.  Redis Cluster runs with 1
and with 3 shards to show scaling.

Servers: started on loopback for the run (``bench.harness.servers``) unless ``--redis-url`` /
``--redis-cluster-url`` / ``--mooncake-master`` point at existing ones.  Everything shares
this machine's cores with the servers, so absolute numbers are a loopback floor, not a NIC's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.config import MooncakeConfig, RedisConfig, parse_size
from kvtier.config_checks import ByteSize
from kvtier.keys import chunk_keys, namespace_key
from kvtier.layout import LLAMA_3_1_8B, KVLayout
from kvtier.tiers.base import Tier

Row = dict[str, Any]
ENGINES = ("redis", "redis-cluster", "mooncake")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total", default="256MiB", help="bytes moved per round, engine and chunk size")
    parser.add_argument("--batch", default="64MiB", help="bytes per pipelined batch")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds (a smoke run)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    parser.add_argument("--redis-url", default=None, help="an existing standalone Redis/Valkey")
    parser.add_argument("--redis-cluster-url", default=None, help="a seed node of an existing Redis Cluster")
    parser.add_argument("--redis-password", default=None)
    parser.add_argument("--mooncake-master", default=None, help="host:port of an existing mooncake_master")
    parser.add_argument("--mooncake-metadata", default=None, help="its metadata server URL")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")


# --- the measured work ------------------------------------------------------------------------

class Workload:
    """``n`` chunks of one layout, fresh keys per round, and buffers to read into."""

    def __init__(self, layout: KVLayout, n: int, batch: int, payload_arena: np.ndarray, out_arena: np.ndarray):
        self.layout, self.n, self.batch = layout, n, batch
        cb = layout.chunk_bytes
        self.payloads = [payload_arena[i * cb:(i + 1) * cb] for i in range(n)]  # (chunk_bytes,) views
        self.outs = [out_arena[i * cb:(i + 1) * cb] for i in range(n)]
        self.round = 0

    def fresh_keys(self) -> list[Any]:
        self.round += 1
        tokens = np.random.default_rng(self.round).integers(0, 2**31 - 1, self.n * self.layout.tokens_per_chunk)
        return chunk_keys(tokens, tokens_per_chunk=self.layout.tokens_per_chunk,
                          namespace=namespace_key(self.layout, uuid.uuid4().hex))

    def batches(self) -> Iterator[slice]:
        for s in range(0, self.n, self.batch):
            yield slice(s, min(s + self.batch, self.n))


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _measure(engine: str, w: Workload, repeat: int, tier: Tier,
             raw_put: Callable[[list[str]], None], raw_get: Callable[[list[str]], None],
             raw_delete: Callable[[list[str]], None], name_of: Callable[[Any], str], baseline: str) -> list[Row]:
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(repeat):
        for who in (("raw", "kvtier") if r % 2 == 0 else ("kvtier", "raw")):  # neither always goes first
            keys = w.fresh_keys()
            names = [name_of(k) for k in keys]
            if who == "raw":
                put_s = _timed(partial(raw_put, names))
                get_s = _timed(partial(raw_get, names))
            else:
                def put(keys: list[Any] = keys) -> None:
                    for b in w.batches():
                        if not all(tier.put_many(keys[b], w.payloads[b])):
                            raise RuntimeError(f"{engine}: kvtier put failed; stats {tier.stats}")

                def get(keys: list[Any] = keys) -> None:
                    for b in w.batches():
                        if not all(tier.get_many_into(keys[b], w.outs[b])):
                            raise RuntimeError(f"{engine}: kvtier get missed; stats {tier.stats}")

                put_s, get_s = _timed(put), _timed(get)
                if not np.array_equal(w.outs[-1], w.payloads[-1]):
                    raise RuntimeError(f"{engine}: kvtier returned wrong bytes")
            times.setdefault((who, "put"), []).append(put_s)
            times.setdefault((who, "get"), []).append(get_s)
            raw_delete(names)
    nbytes = w.n * w.layout.chunk_bytes
    rows = []
    for op in ("put", "get"):
        kv, raw = statistics.median(times[("kvtier", op)]), statistics.median(times[("raw", op)])
        # raw / kvtier within each round (the two ran back to back): steadier than the ratio of
        # medians when the machine's load drifts between rounds
        paired = statistics.median(r / k for r, k in zip(times[("raw", op)], times[("kvtier", op)], strict=True))
        rows.append({"tier": engine, "op": op, "shape": w.layout.model, "chunk_bytes": w.layout.chunk_bytes,
                     "chunks": w.n, "batch_chunks": w.batch, "gbps": nbytes / kv / 1e9, "baseline": baseline,
                     "baseline_gbps": nbytes / raw / 1e9, "ratio": raw / kv, "paired_ratio": paired})
    return rows


# --- Redis ------------------------------------------------------------------------------------

def bench_redis(engine: str, url: str, password: str | None, cluster: bool, w: Workload, repeat: int) -> list[Row]:
    import redis

    from kvtier.tiers.redis import RedisTier

    timeout = 30.0  # a benchmark moves hundreds of MiB per pipeline: no TTFT-sized timeouts here
    config = RedisConfig(url=url, cluster=cluster, password=password, key_prefix=f"kvtb-{uuid.uuid4().hex[:8]}",
                         socket_timeout_s=timeout, connect_timeout_s=5.0)
    tier = RedisTier(w.layout, config)
    raw: Any = (redis.RedisCluster.from_url(url, password=password, socket_timeout=timeout) if cluster
                else redis.Redis.from_url(url, password=password, socket_timeout=timeout))

    def raw_put(names: list[str]) -> None:
        for b in w.batches():
            pipe = raw.pipeline(transaction=False) if not cluster else raw.pipeline()
            for name, p in zip(names[b], w.payloads[b], strict=True):
                pipe.set(name, p.data)
            pipe.execute()

    def raw_get(names: list[str]) -> None:
        for b in w.batches():
            pipe = raw.pipeline(transaction=False) if not cluster else raw.pipeline()
            for name in names[b]:
                pipe.get(name)
            values = pipe.execute()
            if any(not isinstance(v, bytes) or len(v) != w.layout.chunk_bytes for v in values):
                raise RuntimeError(f"{engine}: raw GET missed or returned a wrong size")

    def raw_delete(names: list[str]) -> None:
        pipe = raw.pipeline(transaction=False) if not cluster else raw.pipeline()
        for name in names:
            pipe.delete(name)
        pipe.execute()

    try:
        baseline = "redis-py cluster pipeline SET/GET" if cluster else "redis-py pipeline SET/GET"
        return _measure(engine, w, repeat, tier, raw_put, raw_get, raw_delete,
                        lambda k: tier.redis_key(k).decode(), baseline)
    finally:
        tier.close()
        raw.close()


# --- Mooncake ---------------------------------------------------------------------------------

def bench_mooncake(master: str, metadata: str, w: Workload, repeat: int,
                   payload_arena: np.ndarray, out_arena: np.ndarray) -> list[Row]:
    from mooncake.store import MooncakeDistributedStore

    from kvtier.tiers.mooncake import MooncakeTier

    slot = 64 + w.layout.chunk_bytes
    config = MooncakeConfig(master_address=master, metadata_server=metadata, global_segment_size=ByteSize(0),
                            local_buffer_size=ByteSize(16 << 20), staging_bytes=ByteSize(w.batch * slot),
                            timeout_s=60.0, key_prefix=f"kvtb-{uuid.uuid4().hex[:8]}")
    tier = MooncakeTier(w.layout, config)
    raw = MooncakeDistributedStore()
    if raw.setup("127.0.0.1", metadata, 0, 16 << 20, "tcp", "", master) != 0:
        raise RuntimeError(f"raw Mooncake client could not connect to {master}")
    for arena in (payload_arena, out_arena):
        if raw.register_buffer(arena.ctypes.data, arena.nbytes) != 0:
            raise RuntimeError("raw Mooncake register_buffer failed")
    cb = w.layout.chunk_bytes

    def raw_put(names: list[str]) -> None:
        for b in w.batches():
            ptrs = [payload_arena.ctypes.data + i * cb for i in range(b.start, b.stop)]
            codes = raw.batch_put_from(names[b], ptrs, [cb] * len(ptrs))
            if any(c != 0 for c in codes):
                raise RuntimeError(f"raw Mooncake put failed: {set(codes)}")

    def raw_get(names: list[str]) -> None:
        for b in w.batches():
            ptrs = [out_arena.ctypes.data + i * cb for i in range(b.start, b.stop)]
            codes = raw.batch_get_into(names[b], ptrs, [cb] * len(ptrs))
            if any(c != cb for c in codes):
                raise RuntimeError(f"raw Mooncake get failed: {set(codes)}")

    def raw_delete(names: list[str]) -> None:
        raw.batch_remove(names, True)

    try:
        return _measure("mooncake", w, repeat, tier, raw_put, raw_get, raw_delete,
                        lambda k: tier.object_key(k), "mooncake batch_put_from/batch_get_into")
    finally:
        tier.close()
        raw.unregister_buffer(payload_arena.ctypes.data)
        raw.unregister_buffer(out_arena.ctypes.data)
        raw.close()


# --- driver -----------------------------------------------------------------------------------

def rows(args: argparse.Namespace) -> list[Row]:
    """Every G4 row; also called by ``kvtier bench tiers --g4`` (missing options take defaults)."""
    from bench.harness.servers import MooncakeServers, RedisClusterServers, RedisServer

    quick = getattr(args, "quick", False)
    total = parse_size("64MiB" if quick else getattr(args, "total", "256MiB"))
    total = min(total, 1 << 30)
    batch_bytes = parse_size(getattr(args, "batch", "64MiB"))
    repeat = 2 if quick else getattr(args, "repeat", 3)
    engines = [e.strip() for e in str(getattr(args, "engines", ",".join(ENGINES))).split(",") if e.strip()]
    layouts = [replace(LLAMA_3_1_8B, tokens_per_chunk=16), LLAMA_3_1_8B]  # 2 MiB and 32 MiB chunks
    out: list[Row] = []
    payload_arena = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    out_arena = np.zeros(total, dtype=np.uint8)

    def workloads() -> Iterator[Workload]:
        for layout in layouts:
            n = max(2, total // layout.chunk_bytes)
            yield Workload(layout, n, max(1, batch_bytes // layout.chunk_bytes), payload_arena, out_arena)

    with contextlib.ExitStack() as stack:
        if "redis" in engines:
            url, password = getattr(args, "redis_url", None), getattr(args, "redis_password", None)
            if url is None:
                server = RedisServer(maxmemory=f"{4 * total // 2**20 + 256}mb")
                stack.callback(server.stop)
                url, password = server.url, server.password
            for w in workloads():
                out += bench_redis("redis", url, password, False, w, repeat)
        if "redis-cluster" in engines:
            given = getattr(args, "redis_cluster_url", None)
            shard_counts = [None] if given else [1, 3]
            for shards in shard_counts:
                if shards is None:
                    url, password, name = str(given), getattr(args, "redis_password", None), "redis-cluster"
                else:
                    cl = RedisClusterServers(shards, maxmemory=f"{4 * total // 2**20 + 256}mb")
                    url, password, name = cl.url, cl.password, f"redis-cluster-{shards}"
                try:
                    for w in workloads():
                        out += bench_redis(name, url, password, True, w, repeat)
                finally:
                    if shards is not None:
                        cl.stop()
        if "mooncake" in engines:
            master, metadata = getattr(args, "mooncake_master", None), getattr(args, "mooncake_metadata", None)
            if master is None:
                mc = MooncakeServers(segment_size=f"{3 * total // 2**20 + 256}MB")
                stack.callback(mc.stop)
                master, metadata = mc.master_address, mc.metadata_server
            for w in workloads():
                out += bench_mooncake(str(master), str(metadata), w, repeat, payload_arena, out_arena)
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    result = rows(args)
    table = Table(title="kvtier G4 tiers vs raw clients (same run, medians)")
    for col in ("tier", "op", "chunk", "batch", "kvtier GB/s", "baseline", "baseline GB/s", "ratio", "paired"):
        table.add_column(col, justify="right" if "GB" in col or col in ("ratio", "paired", "chunk", "batch")
                         else "left")
    for r in result:
        colour = "green" if r["ratio"] >= 0.8 else "red"
        table.add_row(r["tier"], r["op"], f"{r['chunk_bytes'] / 2**20:.0f} MiB", str(r["batch_chunks"]),
                      f"{r['gbps']:.2f}", r["baseline"], f"{r['baseline_gbps']:.2f}",
                      f"[{colour}]{r['ratio']:.2f}x[/{colour}]", f"{r['paired_ratio']:.2f}x")
    console.print(table)
    scaling = {(r["op"], r["chunk_bytes"]): r for r in result if r["tier"] == "redis-cluster-1"}
    for r in result:
        base = scaling.get((r["op"], r["chunk_bytes"]))
        if r["tier"] == "redis-cluster-3" and base:
            kv, raw = r["gbps"] / base["gbps"], r["baseline_gbps"] / base["baseline_gbps"]
            console.print(f"Redis Cluster 1 -> 3 shards, {r['op']} {r['chunk_bytes'] / 2**20:.0f} MiB: "
                          f"kvtier {kv:.2f}x, raw {raw:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "g4", "rows": result}, indent=2))
        console.print(f"wrote {args.json}")
    return 0
