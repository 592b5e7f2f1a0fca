"""Node-like replays: mixes of many Claude Code conversations sharing one cache, every policy vs the bound.

    kvtier bench mixes ../kv-cache-tester/traces --sets tuning,held-out --sizes 30,100 --mixes 2 \\
        --mooncake ../mooncake/conversation_trace.jsonl --json docs/results/mixes.json --md out.md

The conversations of the folder are split once into a tuning and a held-out set
(``bench.sim.workloads.mixes``: seeded shuffle, ``--split-seed``); each mix draws ``--sizes``
conversations of one set, started by a Poisson process of mean gap ``--mean-gap-s``.  Every mix
(and every ``--mooncake`` trace) is measured as ``kvtier bench tight`` does (``tight.measure``:
G2-only and exclusive G2 + G3 capacities as shares of the working set, in tokens and GiB too, every
policy through the real ``ContextMemory``, the prefix-aware bound at the same total capacity).
The tables add the default's ratio to the bound and to the best plain policy
(LRU, lru-prefix, S3-FIFO) at each capacity.  kv-cache-tester blocks are 64 tokens; mixes are
replayed in chunks of ``--chunk-blocks`` blocks (4: 256 tokens, a common KV-connector chunk, and
4x fewer chunk accesses to simulate).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench import tight
from bench.sim import report
from bench.sim.sim import prepare
from bench.sim.workloads.mixes import SPLIT_SEED, TUNING_SHARE, Mix, conversation_files, draw, split
from bench.sim.workloads.mooncake import load_mooncake
from bench.trace import cost_model
from kvtier.errors import ConfigError
from kvtier.policy.registry import POLICIES

PLAIN = ("lru", "lru-prefix", "s3fifo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, nargs="?", default=None,
                        help="a folder of kv-cache-tester conversations (a checkout's traces/)")
    parser.add_argument("--sets", default="tuning,held-out", help="which sets to draw mixes from")
    parser.add_argument("--sizes", default="30", help="conversations per mix, e.g. 30,100")
    parser.add_argument("--mixes", type=int, default=1, help="mixes per set and size")
    parser.add_argument("--mean-gap-s", type=float, default=300.0, help="mean gap between conversation starts")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    parser.add_argument("--tuning-share", type=float, default=TUNING_SHARE)
    parser.add_argument("--chunk-blocks", type=int, default=4, help="kv-cache-tester blocks (64 tokens) per chunk")
    parser.add_argument("--mooncake", type=Path, action="append", default=[], help="also this Mooncake trace")
    parser.add_argument("--g2", default="1%,2%,5%", help="G2-only capacities, %% of the working set")
    parser.add_argument("--g2-g3", default="1%+2%,1%+5%", help="G2+G3 capacities (exclusive tiers)")
    parser.add_argument("--policy", default="lru,lru-prefix,s3fifo,agent", help=f"of {sorted(POLICIES)}")
    parser.add_argument("--default", default=tight.DEFAULT_POLICY, help="the policy the ratio columns are for")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--cost-model", default="auto", help="as for 'kvtier bench trace'")
    parser.add_argument("--gpu-flops", type=float, default=5.7e14)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--md", type=Path, default=None, help="write the tables as Markdown here")


def mixes(folder: Path, sets: list[str], sizes: list[int], count: int, mean_gap_s: float, seed: int,
          tuning_share: float) -> list[Mix]:
    tuning, held_out = split(conversation_files(folder), seed=seed, tuning_share=tuning_share)
    pools = {"tuning": tuning, "held-out": held_out}
    unknown = [s for s in sets if s not in pools]
    if unknown:
        raise ConfigError(f"--sets: unknown {unknown[0]!r}; known: tuning, held-out")
    return [draw(pools[s], count=n, mix=m, mean_gap_s=mean_gap_s, set_name=s, seed=seed)
            for s in sets for n in sizes for m in range(count)]


def best_plain(row: dict[str, Any]) -> tuple[str, float] | None:
    plain = [(p, row["hit"][p]) for p in PLAIN if p in row["hit"]]
    return max(plain, key=lambda x: x[1]) if plain else None


def markdown(result: dict[str, Any], policies: list[str], default: str) -> str:
    gib = 1 << 30
    head = ["capacity", "tokens", "GiB", *policies, "bound", f"{default} / bound", f"{default} / best plain"]
    lines = [f"**{result['trace']}**: {result['requests']:,} requests, {result.get('sessions', 0):,} sessions, "
             f"working set {result['unique_chunks']:,} chunks of {result['chunk_tokens']} tokens = "
             f"{result['working_set_bytes'] / gib:.1f} GiB; ideal {100 * result['ideal']:.1f}%; simulator "
             f"{result['speed']['chunk_accesses_per_s']:,.0f} chunk accesses/s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        hit, best = row["hit"], best_plain(row)
        cells = [row["capacity"], f"{row['tokens']:,}", f"{row['bytes'] / gib:.2f}",
                 *(f"{100 * hit[p]:.1f}%" for p in policies), f"{100 * row['bound']:.1f}%",
                 f"**{hit[default] / row['bound']:.2f}**" if row["bound"] else "-",
                 f"{hit[default] / best[1]:.2f} ({best[0]})" if best and best[1] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    policies = tight.parse_policies(args.policy, args.default)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: expected e.g. 30,100") from None
    capacities = tight.parse_capacities(args.g2, args.g2_g3)
    args.dram_gbps = args.disk_gbps = args.disk_latency_ms = args.remote_gbps = args.remote_latency_ms = None
    cost = cost_model(args)
    streams: list[tuple[str, Any, int]] = []
    if args.folder is not None:
        sets = [s.strip() for s in args.sets.split(",") if s.strip()]
        for mix in mixes(args.folder, sets, sizes, args.mixes, args.mean_gap_s, args.split_seed, args.tuning_share):
            streams.append((mix.name, mix.load, args.chunk_blocks))
    for path in args.mooncake:
        streams.append((path.name, lambda p=path: load_mooncake(p), 1))
    if not streams:
        raise ConfigError("nothing to replay: give a folder of conversations and/or --mooncake")
    started, load_before = time.perf_counter(), os.getloadavg()
    results, tables = [], []
    for name, load, chunk_blocks in streams:
        requests = load()
        work = prepare(requests, chunk_blocks=chunk_blocks)
        result = tight.measure(name, work, cost, capacities, policies)
        result["sessions"] = len({r.session for r in requests})
        result["duration_s"] = requests[-1].time_s - requests[0].time_s
        results.append(result)
        tables.append(markdown(result, policies, args.default))
        print(tables[-1] + "\n", flush=True)
    ratios = [row["hit"][args.default] / row["bound"] for r in results for row in r["rows"] if row["bound"]]
    vs_plain = [row["hit"][args.default] / b[1] for r in results for row in r["rows"]
                if (b := best_plain(row)) and b[1]]
    sim_s = sum(r["speed"]["sim_s"] for r in results)
    accesses = sum(r["chunk_accesses"] * len(capacities) * len(policies) for r in results)
    runs = [row["chunk_accesses_per_s"][p] for r in results for row in r["rows"] for p in policies]
    summary = {"default": args.default, "min_ratio_to_bound": min(ratios, default=float("nan")),
               "min_ratio_to_best_plain": min(vs_plain, default=float("nan"))}
    speed = {"chunk_accesses_per_s": accesses / sim_s if sim_s else float("nan"), "sim_s": sim_s,
             "slowest_run_chunk_accesses_per_s": min(runs, default=float("nan")),
             "wall_s": time.perf_counter() - started, "load_avg_before": load_before,
             "load_avg_after": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"{args.default}: worst ratio to the bound {summary['min_ratio_to_bound']:.2f}, worst ratio to the best "
          f"plain policy {summary['min_ratio_to_best_plain']:.3f}; simulator {speed['chunk_accesses_per_s']:,.0f} "
          f"chunk accesses/s, slowest run {speed['slowest_run_chunk_accesses_per_s']:,.0f}/s")
    doc = {"benchmark": "kvtier bench mixes", "model": cost.shape.layout.model, "cost_model": cost.source,
           "policies": policies, "split_seed": args.split_seed, "tuning_share": args.tuning_share,
           "mean_gap_s": args.mean_gap_s, "chunk_blocks": args.chunk_blocks, "summary": summary, "speed": speed,
           "mixes": [{"name": m, "files": [p.name for p in mm.files], "starts_s": list(mm.starts_s)}
                     for m, mm in _mix_index(args, sizes)],
           "traces": results}
    report.write_outputs(args.json, doc, args.md, tables)
    return 0


def _mix_index(args: argparse.Namespace, sizes: list[int]) -> list[tuple[str, Mix]]:
    if args.folder is None:
        return []
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    return [(m.name, m) for m in mixes(args.folder, sets, sizes, args.mixes, args.mean_gap_s, args.split_seed,
                                       args.tuning_share)]
