"""The node tier (``kvtier serve``) against the embedded pool: lookup round trips and put/get bandwidth.

* Lookup: ``NodeTier.contains_many`` of a ``--prefix``-chunk prefix (one round trip to the service
  on its Unix socket) vs ``ContextMemory.lookup`` on an embedded DRAM hierarchy (in-process, no
  round trip), every chunk held.  p50 / p99 in microseconds over ``--calls`` calls a round.
  The floor of any such service is a bare round trip between two Python processes on a Unix
  socket (an echo of the same bytes, measured in the same run: the "socket echo" row).
* Bandwidth: ``put_many`` / ``get_many_into`` of ``--total`` bytes in chunks of the chosen shape,
  through the service's shared pool (reserve, copy into the mapped slot, commit; acquire, copy out,
  release) vs an in-process ``DramTier`` (one copy each), both pools populated up front.  The
  chunks are deleted between rounds, so every put copies.

The service is started here (a ``kvtier serve`` subprocess on a temporary socket).  Rounds alternate
embedded and node; the table gives the median over rounds and the spread (min-max).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.config import parse_size
from kvtier.config_node import NodeConfig
from kvtier.hierarchy import ContextMemory
from kvtier.keys import chunk_keys, namespace_key
from kvtier.layout import KNOWN_LAYOUTS, KVLayout
from kvtier.tiers.dram import DramTier
from kvtier.tiers.node import NodeTier

Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(KNOWN_LAYOUTS),
                        help="chunk shape (256 tokens a chunk)")
    parser.add_argument("--total", default="384MiB", help="bytes moved per bandwidth round")
    parser.add_argument("--prefix", type=int, default=16, help="chunks per lookup (16 x 256 = 4K tokens)")
    parser.add_argument("--calls", type=int, default=2000, help="lookups per round")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")


def _keys(layout: KVLayout, n: int, seed: int = 0) -> list[Any]:
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * layout.tokens_per_chunk)
    return chunk_keys(tokens, tokens_per_chunk=layout.tokens_per_chunk, namespace=namespace_key(layout))


def _latencies(call: Callable[[], object], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - start) / 1e3)
    return out


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench_lookup(layout: KVLayout, node: NodeTier, prefix: int, calls: int, repeat: int) -> list[Row]:
    small = KVLayout(model=layout.model + "/lookup", num_layers=1, num_kv_heads=1, head_dim=1)
    keys = _keys(small, prefix, seed=1)
    memory = ContextMemory(small, [DramTier(small, capacity_bytes=prefix * small.chunk_bytes, pin_memory=False)],
                           eviction="lru")
    memory.store(keys, [np.zeros(small.chunk_bytes, np.uint8)] * prefix)
    node_keys = _keys(layout, prefix, seed=1)
    assert all(node.put_many(node_keys, [np.zeros(layout.chunk_bytes, np.uint8)] * prefix))
    rounds: dict[str, list[tuple[float, float]]] = {"embedded": [], "node": []}
    for _ in range(repeat):
        for name, call in (("embedded", lambda: memory.lookup(keys)), ("node", lambda: node.contains_many(node_keys))):
            lat = _latencies(call, calls)
            rounds[name].append((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))
    assert memory.lookup(keys).num_chunks == prefix and all(node.contains_many(node_keys))
    memory.close()
    node.delete_many(node_keys)
    return [{"what": f"lookup {prefix} chunks", "path": name, "p50_us": [r[0] for r in rs],
             "p99_us": [r[1] for r in rs]} for name, rs in rounds.items()]


def bench_echo(size: int, calls: int, repeat: int) -> Row:
    """p50/p99 of a bare Python echo round trip of ``size`` bytes over a Unix socketpair (a forked child)."""
    import os
    import socket

    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # the echo: read, write back, until closed
        ours.close()
        while data := theirs.recv(1 << 16):
            theirs.sendall(data)
        os._exit(0)
    theirs.close()
    message, rounds = b"x" * size, []

    def ping() -> None:
        ours.sendall(message)
        ours.recv(1 << 16)

    for _ in range(repeat):
        lat = _latencies(ping, calls)
        rounds.append((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))
    ours.close()
    os.waitpid(child, 0)
    return {"what": f"socket echo {size} B", "path": "python echo", "p50_us": [r[0] for r in rounds],
            "p99_us": [r[1] for r in rounds]}


def bench_bandwidth(layout: KVLayout, node: NodeTier, total: int, repeat: int) -> list[Row]:
    n = max(1, total // layout.chunk_bytes)
    keys = _keys(layout, n, seed=2)
    payloads = [np.random.default_rng(i).integers(0, 256, layout.chunk_bytes, dtype=np.uint8) for i in range(n)]
    outs = [np.ones(layout.chunk_bytes, np.uint8) for _ in range(n)]
    dram = DramTier(layout, capacity_bytes=n * layout.chunk_bytes, pin_memory=False)
    tiers: dict[str, Any] = {"embedded": dram, "node": node}
    gbps: dict[tuple[str, str], list[float]] = {(op, name): [] for op in ("put", "get") for name in tiers}
    for _ in range(repeat):
        for name, tier in tiers.items():
            tier.delete_many(keys)
            start = time.perf_counter()
            stored = tier.put_many(keys, payloads)
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            got = tier.get_many_into(keys, outs)
            get_s = time.perf_counter() - start
            assert all(stored) and all(got), (name, sum(stored), sum(got))
            assert all((o == p).all() for o, p in zip(outs[:4], payloads[:4], strict=False))
            gbps["put", name].append(n * layout.chunk_bytes / put_s / 1e9)
            gbps["get", name].append(n * layout.chunk_bytes / get_s / 1e9)
            outs[0][:] = 1
    node.delete_many(keys)
    dram.close()
    return [{"what": f"{op} {n} x {layout.chunk_bytes >> 20} MiB", "path": name, "gbps": values}
            for (op, name), values in gbps.items()]


def run(args: argparse.Namespace) -> int:
    layout = KNOWN_LAYOUTS[args.shape]
    total = parse_size(args.total, "--total")
    where = Path(tempfile.mkdtemp(prefix="kvnb", dir="/tmp"))
    sock = where / "node.sock"
    pool = total + (args.prefix + 2) * layout.chunk_bytes
    service = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--socket", str(sock),
                                "--dram", str(pool)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        node = NodeTier(layout, NodeConfig(url=f"unix://{sock}", deadline_s=10.0))
        rows = bench_lookup(layout, node, args.prefix, args.calls, args.repeat)
        echo = bench_echo(len(json.dumps({"op": "lookup", "keys": "00" * 16 * args.prefix})), args.calls, args.repeat)
        rows += bench_bandwidth(layout, node, total, args.repeat)
        node.close()
    finally:
        service.terminate()
        service.wait(10)
        shutil.rmtree(where, ignore_errors=True)
    print(f"kvtier bench node: {args.shape}, {args.repeat} alternating rounds; median (min-max) over rounds\n")
    print("| measurement | embedded | node (kvtier serve) | node / embedded |")
    print("|---|---|---|---|")
    for embedded, served in zip(rows[::2], rows[1::2], strict=True):
        if "gbps" in embedded:
            ratio = statistics.median(served["gbps"]) / statistics.median(embedded["gbps"])
            print(f"| {embedded['what']} GB/s | {_spread(embedded['gbps'], '{:.2f}')} | "
                  f"{_spread(served['gbps'], '{:.2f}')} | {ratio:.2f} |")
        else:
            for q in ("p50_us", "p99_us"):
                ratio = statistics.median(served[q]) / statistics.median(embedded[q])
                print(f"| {embedded['what']} {q.replace('_us', '')} µs | {_spread(embedded[q])} | "
                      f"{_spread(served[q])} | {ratio:.1f}x |")
    print(f"\nfloor, {echo['what']} between two Python processes: p50 {_spread(echo['p50_us'])} µs, "
          f"p99 {_spread(echo['p99_us'])} µs")
    if args.json:
        args.json.write_text(json.dumps([*rows, echo], indent=1))
    return 0
