"""Tier throughput vs raw baselines, measured in the same run; plus prefix-lookup latency.

For each chunk shape (Llama-3.1-8B: 32 MiB a chunk; Qwen2.5-0.5B: 3 MiB a chunk):

* DRAM put/get vs a raw ``numpy.copyto`` of the same bytes between preallocated buffers.
* Disk put/get vs raw sequential file write+fsync / read of the same bytes into a preallocated
  buffer.  Reads are *cold* by default: the page cache is dropped for every file first
  (``posix_fadvise(DONTNEED)``, for kvtier and baseline alike), so they hit the device.
* ``--g4`` adds the Redis/Mooncake rows of ``kvtier bench g4``.

Every measurement alternates baseline and kvtier ``--repeat`` times and reports medians, so a
noisy machine moves both.  ``ratio`` = kvtier throughput / baseline throughput (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.hierarchy import ContextMemory
from kvtier.keys import chunk_keys, namespace_key
from kvtier.layout import LLAMA_3_1_8B, QWEN2_5_0_5B, KVLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total", default="512MiB", help="bytes moved per measurement and shape")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the disk tier (default: a temp dir)")
    parser.add_argument("--warm", action="store_true", help="disk reads from the page cache instead of cold")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (a smoke run)")
    parser.add_argument("--g4", action="store_true", help="also benchmark the Redis/Mooncake tiers")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")


def _median_time(fn: Callable[[], object], setup: Callable[[], None] | None = None) -> float:
    if setup:
        setup()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _compare(name: str, op: str, layout: KVLayout, n: int, repeat: int,
             kvtier_fn: Callable[[], object], base_fn: Callable[[], object], base_name: str,
             setup: Callable[[], None] | None = None) -> Row:
    kv_times, base_times = [], []
    for _ in range(repeat):
        base_times.append(_median_time(base_fn, setup))
        kv_times.append(_median_time(kvtier_fn, setup))
    nbytes = n * layout.chunk_bytes
    kv, base = statistics.median(kv_times), statistics.median(base_times)
    return {"tier": name, "op": op, "shape": layout.model, "chunk_bytes": layout.chunk_bytes, "chunks": n,
            "gbps": nbytes / kv / 1e9, "baseline": base_name, "baseline_gbps": nbytes / base / 1e9,
            "ratio": base / kv}


def bench_dram(layout: KVLayout, n: int, repeat: int) -> list[Row]:
    keys = chunk_keys(np.arange(n * layout.tokens_per_chunk), tokens_per_chunk=layout.tokens_per_chunk,
                      namespace=namespace_key(layout))
    payloads = [np.random.default_rng(i).integers(0, 256, layout.chunk_bytes, dtype=np.uint8) for i in range(n)]
    outs = [np.empty(layout.chunk_bytes, np.uint8) for _ in range(n)]
    tier = DramTier(layout, capacity_bytes=n * layout.chunk_bytes)
    raw = np.empty(n * layout.chunk_bytes, np.uint8)  # the raw baseline's own "pool"
    slots = [raw[i * layout.chunk_bytes:(i + 1) * layout.chunk_bytes] for i in range(n)]
    for buf in (raw, *outs):
        buf.fill(0)  # fault pages in before timing, for both sides

    def kv_put() -> None:
        tier.delete_many(keys)
        tier.put_many(keys, payloads)

    def raw_put() -> None:
        for s, p in zip(slots, payloads, strict=True):
            np.copyto(s, p)

    kv_put()
    rows = [_compare("dram", "put", layout, n, repeat, kv_put, raw_put, "numpy memcpy")]
    def raw_get() -> None:
        for o, s in zip(outs, slots, strict=True):
            np.copyto(o, s)

    rows.append(_compare("dram", "get", layout, n, repeat, lambda: tier.get_many_into(keys, outs), raw_get,
                         "numpy memcpy"))
    assert all((o == p).all() for o, p in zip(outs, payloads, strict=True))
    tier.close()
    return rows


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


DISK_THREADS = 4  # kvtier's default disk io_threads


def _read_into(path: Path, out: np.ndarray) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(out.data)


def bench_disk(layout: KVLayout, n: int, repeat: int, root: Path, warm: bool) -> list[Row]:
    keys = chunk_keys(np.arange(n * layout.tokens_per_chunk), tokens_per_chunk=layout.tokens_per_chunk,
                      namespace=namespace_key(layout))
    payloads = [np.random.default_rng(i).integers(0, 256, layout.chunk_bytes, dtype=np.uint8) for i in range(n)]
    outs = [np.zeros(layout.chunk_bytes, np.uint8) for _ in range(n)]
    tier = DiskTier(layout, path=root / "kvtier", capacity_bytes=2 * n * layout.chunk_bytes, fsync=True,
                    io_threads=DISK_THREADS)
    raw_dir = root / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw_paths = [raw_dir / f"chunk{i}.bin" for i in range(n)]

    def kv_put() -> None:
        tier.delete_many(keys)
        tier.put_many(keys, payloads)

    def raw_put() -> None:
        for path, p in zip(raw_paths, payloads, strict=True):
            with open(path, "wb") as f:
                f.write(p.data)
                f.flush()
                os.fsync(f.fileno())

    def raw_get() -> None:
        for path, o in zip(raw_paths, outs, strict=True):
            _read_into(path, o)

    rows = [_compare("disk", "put", layout, n, repeat, kv_put, raw_put, "file write+fsync")]
    kv_put()
    raw_put()
    drop = None if warm else (lambda: _drop_cache(raw_paths + [tier.path_of(k) for k in keys]))
    op, base = ("get (page cache)", "file read (page cache)") if warm else ("get", "file read")
    rows.append(_compare("disk", op, layout, n, repeat, lambda: tier.get_many_into(keys, outs), raw_get,
                         base, setup=drop))
    # The same reads with as many threads as kvtier's I/O pool: separates "parallel I/O" from
    # "kvtier's own overhead" (header parse, checksum) in the ratio above.
    with ThreadPoolExecutor(DISK_THREADS) as pool:
        def raw_get_parallel() -> None:
            list(pool.map(_read_into, raw_paths, outs))

        rows.append(_compare("disk", op, layout, n, repeat, lambda: tier.get_many_into(keys, outs),
                             raw_get_parallel, f"{base}, {DISK_THREADS} threads", setup=drop))
    ok = tier.get_many_into(keys, outs)
    assert all(ok) and all((o == p).all() for o, p in zip(outs, payloads, strict=True))
    tier.close()
    return rows


def bench_lookup(num_tokens: int = 1 << 20, repeat: int = 50) -> list[Row]:
    """Longest-prefix lookup over a fully cached 1M-token sequence (256-token chunks)."""
    layout = KVLayout(model="lookup-bench", num_layers=1, num_kv_heads=1, head_dim=1, dtype="uint8",
                      tokens_per_chunk=256)
    tokens = np.random.default_rng(0).integers(0, 128_000, num_tokens)
    mem = ContextMemory(layout, [DramTier(layout, capacity_bytes=(num_tokens // 256 + 1) * layout.chunk_bytes)])
    t = time.perf_counter()
    keys = mem.keys_for(tokens)
    hash_s = time.perf_counter() - t
    zero = np.zeros(layout.chunk_bytes, np.uint8)
    mem.store(keys, [zero] * len(keys))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        hit = mem.lookup(keys)
        times.append(time.perf_counter() - t)
    assert hit.num_tokens == len(keys) * 256
    mem.close()
    return [{"tier": "index", "op": "lookup 1M tokens", "shape": "any", "chunks": len(keys),
             "lookup_ms": statistics.median(times) * 1e3, "hash_ms": hash_s * 1e3, "target_ms": 1.0}]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvtier.config import parse_size
    from kvtier.errors import ConfigError

    total = parse_size("64MiB" if args.quick else args.total)
    repeat = 2 if args.quick else args.repeat
    try:
        root = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.dir))
    except OSError as exc:
        raise ConfigError(f"--dir {str(args.dir)!r}: cannot make a directory there: {exc.strerror or exc}") from None
    console = Console(width=150)
    rows: list[Row] = []
    try:
        for layout in (LLAMA_3_1_8B, QWEN2_5_0_5B):  # 32 MiB and 3 MiB chunks
            n = max(2, total // layout.chunk_bytes)
            console.print(f"[dim]{layout.model}: {n} chunks of {layout.chunk_bytes / 2**20:.0f} MiB[/dim]")
            rows += bench_dram(layout, n, repeat)
            rows += bench_disk(layout, n, repeat, root / layout.model.replace("/", "_"), args.warm)
        if args.g4:
            import importlib

            rows += importlib.import_module("bench.g4").rows(args)
        rows += bench_lookup(repeat=10 if args.quick else 50)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title="kvtier tiers vs raw baselines (same run, medians)")
    for col in ("tier", "op", "shape", "chunk", "kvtier GB/s", "baseline", "baseline GB/s", "ratio"):
        table.add_column(col, justify="right" if "GB" in col or col in ("ratio", "chunk") else "left")
    for r in rows:
        if "ratio" in r:
            colour = "green" if r["ratio"] >= 0.8 else "red"
            table.add_row(r["tier"], r["op"], r["shape"], f"{r['chunk_bytes'] / 2**20:.0f} MiB", f"{r['gbps']:.2f}",
                          r["baseline"], f"{r['baseline_gbps']:.2f}", f"[{colour}]{r['ratio']:.2f}x[/{colour}]")
    console.print(table)
    for r in rows:
        if r["op"].startswith("lookup"):
            console.print(f"prefix lookup over {r['chunks']} chunks (1M tokens): {r['lookup_ms']:.3f} ms "
                          f"(target < {r['target_ms']} ms); hashing the 1M tokens once: {r['hash_ms']:.2f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "tiers", "rows": rows}, indent=2))
        console.print(f"wrote {args.json}")
    return 0
