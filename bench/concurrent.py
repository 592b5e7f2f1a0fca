"""``kvtier bench vllm --concurrent``: N agent sessions live against one vLLM engine per mode.

    kvtier bench vllm --concurrent --sessions 8 --workload synthetic --max-context 2048 --turns 6
    kvtier bench vllm --concurrent --workload kvtester --traces ../shared/traces/kv-cache-tester

Modes, each a fresh ``vllm serve`` on loopback with the same model, flags and
``VLLM_CPU_OMP_THREADS_BIND``, run one after another on the same sessions:

    vllm     plain vLLM: its own prefix cache only
    kvtier   + kvtier (DRAM, then a local disk tier)
    lmcache  + LMCache 0.5.6 (``LMCacheMPConnector``, ``lmcache_driven``; its own ``lmcache server``
             started and stopped by this bench: an L1 as large as kvtier's DRAM, a local-disk L2)

and two kvtier modes that differ only in prefetch (``--modes kvtier-noprefetch,kvtier-prefetch``,
not run by default): both send the hints an agent framework would, in ``kv_transfer_params``
(``bench.harness.sessions.agent_hints``: the session id, and ``awaits: "tool"`` on a turn whose
answer the trace ends in ``tool_use``, "user" on ``end_turn``), so the agent policy sees the same
sessions either way; ``kvtier-noprefetch`` sets ``prefetch.dram_share`` 0, ``kvtier-prefetch``
``--prefetch-share`` (kvtier's default 0.25).  With ``--repeat N`` the modes run N rounds in
``--modes`` order (interleaved: off, on, off, on, ...), every run on a fresh engine and a fresh disk
tier; the table shows the median per mode and the range over rounds.

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

import numpy as np

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

MODES = ("vllm", "kvtier", "lmcache")  # the default set
PREFETCH_MODES = ("kvtier-noprefetch", "kvtier-prefetch")  # kvtier + agent hints, prefetch off / on
ALL_MODES = MODES + PREFETCH_MODES
PREFETCH_COUNTERS = ("prefetch_chunks", "prefetch_used_chunks", "prefetch_wasted_chunks", "prefetch_cancelled",
                     "prefetch_skipped", "answers_awaiting_tool", "answers_awaiting_user")
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
    group.add_argument("--prefetch-share", type=float, default=0.25,
                       help="prefetch.dram_share of the kvtier-prefetch mode (kvtier-noprefetch: 0)")
    group.add_argument("--repeat", type=int, default=1,
                       help="rounds of every mode, interleaved in --modes order (medians and ranges shown)")


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
        results, wall = replay_sessions(sessions, engine.url, model=spec.name, max_output=args.max_output, vocab=vocab,
                                        hints=mode in PREFETCH_MODES)
        cache = _delta(engine.metrics(), before)
        summary = summarize(results, wall)
        stats_file = spec.extra_config.get("stats_file")
        tiers: dict[str, float] = {}
        counters: dict[str, float] = {}
        if spec.connector == "kvtier" and stats_file and Path(stats_file).exists():
            engine.stop()  # the stats file is rewritten at shutdown too: after the last prefetch
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
                        "computed_tokens": queried - own - external, "engine_counters": cache,
                        "prefetch": {k: counters.get(k, 0.0) for k in PREFETCH_COUNTERS} if counters else {}})
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


def kvtier_extra(work: Path, tag: str, *, chunk: int, dram_mib: int, prefetch_share: float | None) -> dict[str, Any]:
    """kvtier's ``kv_connector_extra_config`` for one run: its own disk tier and stats file under ``work``."""
    extra: dict[str, Any] = {"chunk_tokens": chunk, "log_interval_s": 0, "dram": {"capacity": f"{dram_mib}MiB"},
                             "disk": {"path": str(work / f"{tag}-disk"), "capacity": "16GiB", "fsync": False},
                             "stats_file": str(work / f"{tag}-kvtier-stats.json")}
    if prefetch_share is not None:
        extra["prefetch"] = {"dram_share": prefetch_share}
    return extra


def mode_spec(mode: str, base: dict[str, Any], work: Path, *, tag: str, chunk: int, dram_mib: int,
              prefetch_share: float) -> EngineSpec:
    """The engine of one run of ``mode``; ``tag`` names its log, disk tier and stats file."""
    if mode == "vllm":
        return EngineSpec(name=tag, **base)
    if mode == "lmcache":
        return EngineSpec(name=tag, connector="lmcache", **base)
    share = {"kvtier": None, "kvtier-noprefetch": 0.0, "kvtier-prefetch": prefetch_share}[mode]
    extra = kvtier_extra(work, tag, chunk=chunk, dram_mib=dram_mib, prefetch_share=share)
    return EngineSpec(name=tag, connector="kvtier", extra_config=extra, **base)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds: the median of every number (and of every number one level down), errors
    summed, the TTFTs of each round kept (``ttft_p50_s_runs``, ``ttft_p90_s_runs``)."""
    if len(runs) == 1:
        return runs[0]
    def med(values: list[Any]) -> Any:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return float(np.median(np.asarray(values, dtype=float)))
        if all(isinstance(v, dict) for v in values):
            keys = dict.fromkeys(k for v in values for k in v)
            return {k: med([v.get(k, 0.0) for v in values]) for k in keys}
        return values[0]
    out = {k: med([r[k] for r in runs]) for k in runs[0]}
    out.update(errors=sum(r["errors"] for r in runs), rounds=len(runs),
               ttft_p50_s_runs=[r["ttft_p50_s"] for r in runs], ttft_p90_s_runs=[r["ttft_p90_s"] for r in runs])
    return out


def _ttft(s: dict[str, Any], key: str) -> str:
    runs = s.get(f"{key}_runs")
    spread = f" ({min(runs):.3f}-{max(runs):.3f})" if runs else ""
    return f"{s[key]:.3f} s{spread}"


def _prefetch_cell(s: dict[str, Any]) -> str:
    p = s.get("prefetch") or {}
    if not p:
        return "-"
    return (f"{int(p['prefetch_chunks'])} / {int(p['prefetch_used_chunks'])} / {int(p['prefetch_wasted_chunks'])}, "
            f"{int(p['prefetch_cancelled'])}, {int(p['prefetch_skipped'])}")


def run_concurrent(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.harness.models import SHAPES, build_random_model, kv_bytes_per_token
    from kvtier.config import default_cache_dir

    console = Console(width=max(Console().width, 150))  # the tables are wide; a pipe gets 80 columns
    modes = list(args.modes.split(",") if args.modes else MODES)
    if set(modes) - set(ALL_MODES):
        raise SystemExit(f"unknown --modes {sorted(set(modes) - set(ALL_MODES))} with --concurrent; "
                         f"choose from {ALL_MODES}")
    if args.repeat < 1 or not 0 < args.prefetch_share <= 1:
        raise SystemExit("--repeat must be >= 1 and --prefetch-share in (0, 1]")
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
    turns = sum(len(s.turns) for s in sessions)
    console.print(f"{len(sessions)} sessions, {turns} turns, contexts up to {args.max_context} tokens "
                  f"({context_tokens} in all); vLLM KV {engine_kv} tokens, kvtier DRAM = LMCache L1 = {dram_mib} MiB; "
                  f"VLLM_CPU_OMP_THREADS_BIND={args.cpu_bind}")
    out: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.repeat):
        for mode in list(modes):
            tag = f"concurrent-{mode}" + (f"-r{round_}" if args.repeat > 1 else "")
            spec = mode_spec(mode, base, work, tag=tag, chunk=chunk, dram_mib=dram_mib,
                             prefetch_share=args.prefetch_share)
            with console.status(f"{mode} (round {round_ + 1}/{args.repeat}): start the engine, replay {turns} turns"):
                try:
                    out.setdefault(mode, []).append(run_mode(mode, spec, sessions, args, work,
                                                             vocab=shape["vocab_size"], dram_mib=dram_mib))
                except ServerFailed as exc:
                    if mode != "lmcache":
                        raise
                    lmcache_error = f"server or engine did not start: {str(exc).splitlines()[0]}"
                    console.print(f"lmcache: skipped ({lmcache_error})")
                    modes.remove(mode)
    summaries = [aggregate([run["summary"] for run in out[m]]) for m in modes if m in out]
    rounds = f", median of {args.repeat} interleaved rounds (range)" if args.repeat > 1 else ""
    table = Table(title=f"vLLM concurrent: {len(sessions)} {args.workload} sessions x {args.turns} turns, "
                        f"contexts <= {args.max_context}, {shape_name} random model, fp32, vllm-cpu, "
                        f"VLLM_CPU_OMP_THREADS_BIND={args.cpu_bind}{rounds}")
    for col in ("mode", "TTFT p50", "TTFT p90", "req/s", "ITL p50", "ITL p90", "ITL p90 during loads",
                "ITL max during loads", "vLLM cache hits", "connector hits (per tier; LMCache's split estimated)",
                "computed", "prefetched / used / wasted, cancelled, skipped", "errors"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for s in summaries:
        tiers = ", ".join(f"{k} {int(v):,}" for k, v in sorted(s["connector_hit_tokens_by_tier"].items()))
        table.add_row(s["mode"], _ttft(s, "ttft_p50_s"), _ttft(s, "ttft_p90_s"), f"{s['requests_per_s']:.2f}",
                      f"{s['itl_p50_s'] * 1e3:.0f} ms", f"{s['itl_p90_s'] * 1e3:.0f} ms",
                      f"{s['itl_during_loads_p90_s'] * 1e3:.0f} ms", f"{s['itl_during_loads_max_s'] * 1e3:.0f} ms",
                      f"{int(s['vllm_hit_tokens']):,}", f"{int(s['connector_hit_tokens']):,}"
                      + (f" ({tiers})" if tiers else ""), f"{int(s['computed_tokens']):,}", _prefetch_cell(s),
                      str(s["errors"]))
    console.print(table)
    console.print(f"logs in {work}")
    if args.json:
        doc = {"benchmark": "kvtier bench vllm --concurrent", "workload": args.workload, "sessions": len(sessions),
               "turns": args.turns, "max_context": args.max_context, "max_output": args.max_output,
               "time_scale": args.time_scale, "max_gap_s": args.max_gap, "stagger_s": args.stagger,
               "shape": shape_name, "cpu_bind": args.cpu_bind, "engine_kv_tokens": engine_kv,
               "dram_mib": dram_mib, "chunk_tokens": chunk, "block_size": BLOCK_SIZE,
               "max_batched_tokens": base["max_num_batched_tokens"], "lmcache_error": lmcache_error,
               "repeat": args.repeat, "prefetch_share": args.prefetch_share, "modes": summaries,
               "runs": {m: [run["summary"] for run in out[m]] for m in out} if args.repeat > 1 else {},
               "results": {m: out[m][0]["results"] for m in out} if args.repeat == 1
               else {f"{m}#{i}": run["results"] for m in out for i, run in enumerate(out[m])}}
        args.json.write_text(json.dumps(doc, indent=1, default=float))
        console.print(f"wrote {args.json}")
    return 0 if summaries and all(s["errors"] == 0 for s in summaries) else 1
