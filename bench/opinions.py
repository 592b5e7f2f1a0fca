"""Opinions by default, simulated: prefetch during tool pauses and fetch-or-recompute, each on and off.

    kvtier bench opinions ../shared/traces/kv-cache-tester/ --synthetic 0
    kvtier bench opinions TRACES... --g2 2% --g3 100% --disk-gbps 1.5 --json docs/results/sim-opinions.json

Per trace (a folder of kv-cache-tester conversations replays as concurrent sessions; ``--synthetic``
adds the synthetic agents of ``kvtier bench agentic``), G2 DRAM ``--g2`` of the working set over a
G3 disk of ``--g3`` (the defaults: 2% and all of it, inclusive, the default policy), the real
``ContextMemory`` replays the stream twice: without prefetch, and with ``prefetch.dram_share``
(``--prefetch-share``, bounded by what the disk reads in each pause).  Each replay's hits are
priced twice: with the engine's fetch-or-recompute decision (the cost model on: ``KVTierLM``'s
default; a slow hit may be split) and loading every cached chunk (off).  The disk reads at
``--disk-gbps`` (1.5 GB/s, as the H200 machine's disk measures: slower than recomputing short
contexts).  Reported: TTFT p50/p90/mean, the token hit rate, the share of hit tokens served from
DRAM, and the prefetch counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.sim import report
from bench.sim.costmodel import CostModel
from bench.sim.sim import RunResult, TierSpec, Workload, prepare, request_ttfts, simulate
from bench.sim.workloads.synthetic import AgentWorkload, generate
from bench.trace import cost_model, load_paths
from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.policy.registry import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, help="trace files or folders (each folder one trace)")
    parser.add_argument("--synthetic", default="", help="also the synthetic agents for these seeds, e.g. 0,1")
    parser.add_argument("--g2", type=float, default=2.0, help="G2 DRAM, %% of the working set")
    parser.add_argument("--g3", type=float, default=100.0, help="G3 disk, %% of the working set")
    parser.add_argument("--policy", default=KVTierConfig().eviction, help=f"of {sorted(POLICIES)}")
    parser.add_argument("--prefetch-share", type=float, default=KVTierConfig().prefetch.dram_share,
                        help="prefetch.dram_share when prefetch is on")
    parser.add_argument("--disk-gbps", type=float, default=1.5, help="the disk link, GB/s")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--cost-model", default="auto", help="as for 'kvtier bench trace'")
    parser.add_argument("--gpu-flops", type=float, default=5.7e14)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--md", type=Path, default=None, help="write the table as Markdown here")


def summary(run: RunResult, ttft: np.ndarray) -> dict[str, Any]:
    hits = run.hit_tokens.sum(axis=0)
    total = float(hits.sum())
    return {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
            "ttft_mean_s": float(ttft.mean()), "hit_rate": total / float(run.context_tokens.sum()),
            "dram_share_of_hits": float(hits[0]) / total if total else 0.0,
            "hit_tokens_per_tier": {s.name: int(h) for s, h in zip(run.tiers, hits, strict=True)}}


def measure(name: str, work: Workload, cost: CostModel, *, g2: float, g3: float, policy: str,
            prefetch_share: float) -> dict[str, Any]:
    """Both replays of one trace, each priced with the cost model on and off."""
    chunk = cost.shape.layout.bytes_per_token * work.chunk_tokens

    def slots(share: float) -> int:  # chunks in ``share`` percent of the trace's unique ones, at least 1
        return max(1, int(work.unique_chunks * share / 100))

    specs = [TierSpec(name="dram", capacity_bytes=slots(g2) * chunk),
             TierSpec(name="disk", capacity_bytes=slots(g3) * chunk, persistent=True)]
    off = dataclasses.replace(cost, decide=False, split=False)
    context = np.array([r.input_tokens for r in work.requests], dtype=np.int64)
    recompute = request_ttfts(work, cost, ["dram"], np.zeros((len(context), 1), dtype=np.int64))
    rows: list[dict[str, Any]] = []
    sim_s = 0.0
    for share in (0.0, prefetch_share):
        run = simulate(work, cost, specs, policy=policy, prefetch_share=share,
                       prefetch_Bps=cost.links["disk"].bandwidth_Bps, dram_slots=True)
        sim_s += run.wall_s
        for decide, priced in ((True, cost), (False, off)):
            ttft = run.ttft_s if decide else request_ttfts(work, priced, [s.name for s in specs], run.hit_tokens)
            rows.append({"prefetch": share > 0, "cost_model": decide, **summary(run, ttft),
                         "prefetch_stats": run.prefetch})
    return {"trace": name, "requests": len(work.requests), "chunk_tokens": work.chunk_tokens, "chunk_bytes": chunk,
            "unique_chunks": work.unique_chunks, "working_set_bytes": work.unique_chunks * chunk,
            "g2_bytes": specs[0].capacity_bytes, "g3_bytes": specs[1].capacity_bytes,
            "recompute": {"ttft_p50_s": float(np.percentile(recompute, 50)),
                          "ttft_p90_s": float(np.percentile(recompute, 90)), "ttft_mean_s": float(recompute.mean())},
            "rows": rows, "sim_s": sim_s}


def markdown(result: dict[str, Any], source: str = "", disk_Bps: float | None = None) -> str:
    gib = 1 << 30
    rec = result["recompute"]
    lines = [f"**{result['trace']}**: {result['requests']:,} requests, working set "
             f"{result['working_set_bytes'] / gib:.1f} GiB; G2 {result['g2_bytes'] / gib:.2f} GiB, G3 "
             f"{result['g3_bytes'] / gib:.1f} GiB; recompute everything: TTFT p50 {rec['ttft_p50_s']:.3f} s, "
             f"p90 {rec['ttft_p90_s']:.3f} s" + (f"; TTFT figures: {source}" if source else "")
             + (f", the disk at {disk_Bps / 1e9:g} GB/s" if disk_Bps else ""), "",
             "| prefetch | cost model | TTFT p50 (s) | TTFT p90 (s) | TTFT mean (s) | hit rate | hits from DRAM "
             "| prefetched / used / wasted chunks, pauses skipped |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        p = row["prefetch_stats"]
        counts = f"{p['prefetched']:,} / {p['used']:,} / {p['wasted']:,}, {p.get('skipped', 0):,}" if p else "-"
        lines.append(f"| {'on' if row['prefetch'] else 'off'} | {'on' if row['cost_model'] else 'off'} | "
                     f"{row['ttft_p50_s']:.3f} | {row['ttft_p90_s']:.3f} | {row['ttft_mean_s']:.3f} | "
                     f"{100 * row['hit_rate']:.1f}% | {100 * row['dram_share_of_hits']:.1f}% | {counts} |")
    return "\n".join(lines)


def _streams(paths: Sequence[Path], synthetic: str) -> list[tuple[str, Any]]:
    try:
        seeds = [int(s) for s in synthetic.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--synthetic {synthetic!r}: expected seeds, e.g. 0,1") from None
    streams: list[tuple[str, Any]] = [(p.name, partial(load_paths, [p])) for p in paths]
    streams += [(f"synthetic agents, seed {seed}", partial(generate, AgentWorkload(seed=seed))) for seed in seeds]
    if not streams:
        raise ConfigError("nothing to replay: give trace paths or --synthetic seeds")
    return streams


def run(args: argparse.Namespace) -> int:
    if args.policy not in POLICIES:
        raise ConfigError(f"unknown policy {args.policy!r}; known: {sorted(POLICIES)}")
    if not (args.g2 > 0 and args.g3 > 0 and 0 < args.prefetch_share <= 1 and args.disk_gbps > 0):
        raise ConfigError("--g2, --g3 and --disk-gbps must be > 0, --prefetch-share in (0, 1]")
    args.dram_gbps = args.disk_latency_ms = args.remote_gbps = args.remote_latency_ms = None
    cost = cost_model(args)  # with the disk link at --disk-gbps
    started = time.perf_counter()
    results, tables = [], []
    for name, load in _streams(args.paths, args.synthetic):
        result = measure(name, prepare(load()), cost, g2=args.g2, g3=args.g3, policy=args.policy,
                         prefetch_share=args.prefetch_share)
        results.append(result)
        tables.append(markdown(result, cost.source, cost.links["disk"].bandwidth_Bps))
        print(tables[-1] + "\n", flush=True)
    doc = {"benchmark": "kvtier bench opinions", "model": cost.shape.layout.model, "cost_model": cost.source,
           "links_Bps": {n: link.bandwidth_Bps for n, link in cost.links.items()}, "policy": args.policy,
           "g2_pct": args.g2, "g3_pct": args.g3, "prefetch_share": args.prefetch_share,
           "wall_s": time.perf_counter() - started, "traces": results}
    report.write_outputs(args.json, doc, args.md, tables)
    return 0
