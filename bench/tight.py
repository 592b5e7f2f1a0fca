"""Hit rate at tight capacity: every policy against the prefix-aware bound, trace by trace.

    kvtier bench tight ../shared/traces/mooncake_synthetic_trace.jsonl ../shared/traces/kv-cache-tester/
    kvtier bench tight TRACES... --g2 1%,2%,5% --g2-g3 1%+2%,1%+5% --json docs/results/tight.json --md out.md
    kvtier bench tight TRACES... --synthetic 0,1,2   # also the synthetic agents of 'kvtier bench agentic'
    kvtier bench tight TRACES... --foresight deaths,classes,next-use   # the agent told part of the future

Each path is one trace (a folder of kv-cache-tester conversations replays them concurrently;
``--each`` adds every file of a folder as a trace of its own).  For each capacity, given as a
share of that trace's working set (unique chunks x chunk bytes) and reported in tokens and GiB
too, it simulates every policy through the real ``ContextMemory`` (G2 only, or G2 + G3 with
exclusive tiers), and the prefix-aware offline bound (``sim.prefix_bound``) over the same total
capacity.  The table shows each policy's token hit rate, the bound's and the ideal's, the
default policy's ratio to the bound and its lead over LRU in percentage points.  ``--foresight``
adds references that are told a part of the bound's knowledge (``bench.foresight``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.sim import report
from bench.sim.costmodel import CostModel
from bench.sim.foresight import TELLS, family
from bench.sim.sim import RunResult, TierSpec, Workload, ideal, prefix_bound, prepare, simulate
from bench.sim.workloads.synthetic import AgentWorkload, generate
from bench.trace import cost_model, load_paths
from kvtier.errors import ConfigError
from kvtier.policy.registry import POLICIES

DEFAULT_POLICY = "agent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="trace files or folders (each one trace)")
    parser.add_argument("--each", action="store_true", help="also every file of a folder as its own trace")
    parser.add_argument("--synthetic", default="", help="also the synthetic agent workload ('kvtier bench agentic' "
                        "defaults) for these seeds, e.g. 0,1,2")
    parser.add_argument("--g2", default="1%,2%,5%", help="G2-only capacities, %% of the working set")
    parser.add_argument("--g2-g3", default="1%+2%,1%+5%", help="G2+G3 capacities (exclusive tiers)")
    parser.add_argument("--policy", default="lru,lru-prefix,s3fifo,agent", help=f"of {sorted(POLICIES)}")
    parser.add_argument("--default", default=DEFAULT_POLICY, help="the policy the ratio columns are for")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--cost-model", default="auto", help="as for 'kvtier bench trace'")
    parser.add_argument("--gpu-flops", type=float, default=5.7e14)
    parser.add_argument("--foresight", default="", help=f"also the agent told part of the future, of {list(TELLS)}")
    parser.add_argument("--foresight-split-s", type=float, default=10.0,
                        help="'classes': a next use within this many seconds is short, later long")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--md", type=Path, default=None, help="write the tables as Markdown here")


@dataclass(frozen=True, slots=True)
class Capacity:
    g2: float  # share of the working set
    g3: float = 0.0

    @property
    def label(self) -> str:
        return f"G2 {self.g2:g}%" + (f" + G3 {self.g3:g}%" if self.g3 else "")


def parse_policies(names: str, default: str) -> list[str]:
    """``--policy`` (a comma list) plus ``--default`` if missing; ConfigError naming an unknown one."""
    policies = [p.strip() for p in names.split(",") if p.strip()]
    unknown = [p for p in [*policies, default] if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; known: {sorted(POLICIES)}")
    if default not in policies:
        policies.append(default)
    return policies


def parse_capacities(g2: str, g2g3: str) -> list[Capacity]:
    out: list[Capacity] = []
    try:
        out += [Capacity(float(s.strip().rstrip("%"))) for s in g2.split(",") if s.strip()]
        for pair in (p for p in g2g3.split(",") if p.strip()):
            a, b = pair.split("+")
            out.append(Capacity(float(a.strip().rstrip("%")), float(b.strip().rstrip("%"))))
    except ValueError:
        raise ConfigError(f"bad capacities --g2 {g2!r} --g2-g3 {g2g3!r}; expected e.g. 1%,2% and 1%+2%") from None
    if any(c.g2 <= 0 or c.g3 < 0 for c in out):
        raise ConfigError("capacities must be > 0 (G2) and >= 0 (G3)")
    return out


def rate(run: RunResult) -> float:
    return float(run.hit_total.sum() / run.context_tokens.sum())


def measure(name: str, work: Workload, cost: CostModel, capacities: list[Capacity],
            policies: list[str], foresight: Sequence[str] = (), split_s: float = 10.0) -> dict[str, Any]:
    """Every policy, the bound and the ``foresight`` references at every capacity of one trace."""
    chunk = cost.shape.layout.bytes_per_token * work.chunk_tokens

    def slots(share: float) -> int:  # chunks in ``share`` percent of the trace's unique ones
        return int(work.unique_chunks * share / 100)

    rows, sim_s, sim_accesses = [], 0.0, 0
    for cap in capacities:
        specs = [TierSpec(name="dram", capacity_bytes=slots(cap.g2) * chunk)]
        if cap.g3:
            specs.append(TierSpec(name="disk", capacity_bytes=slots(cap.g3) * chunk, persistent=True))
        total = sum(s.capacity_bytes for s in specs)
        row: dict[str, Any] = {"capacity": cap.label, "share_pct": cap.g2 + cap.g3,
                               "tokens": total // chunk * work.chunk_tokens, "bytes": total,
                               "bound": rate(prefix_bound(work, cost, total)), "hit": {}, "ttft_mean_s": {},
                               "chunk_accesses_per_s": {}}
        for policy in policies:
            run = simulate(work, cost, specs, policy=policy, exclusive=True)
            sim_s += run.wall_s
            sim_accesses += work.total_chunk_accesses
            row["hit"][policy] = rate(run)
            row["ttft_mean_s"][policy] = float(run.ttft_s.mean())
            row["chunk_accesses_per_s"][policy] = work.total_chunk_accesses / run.wall_s if run.wall_s else 0.0
        if foresight:
            row["foresight"] = {tell: rate(simulate(work, cost, specs, policy="agent", exclusive=True,
                                                    family=family(work, tell, split_s=split_s)))
                                for tell in foresight}
        rows.append(row)
    return {"trace": name, "requests": len(work.requests), "chunk_tokens": work.chunk_tokens,
            "chunk_bytes": chunk, "unique_chunks": work.unique_chunks,
            "working_set_bytes": work.unique_chunks * chunk, "chunk_accesses": work.total_chunk_accesses,
            "ideal": rate(ideal(work, cost)), "rows": rows,
            "speed": {"sim_s": sim_s, "chunk_accesses_per_s": sim_accesses / sim_s if sim_s else float("nan")}}


def markdown(result: dict[str, Any], policies: list[str], default: str, foresight: Sequence[str] = ()) -> str:
    gib = 1 << 30
    head = ["capacity", "tokens", "GiB", *policies, "bound", f"{default} / bound", f"{default} - lru (pp)",
            *(f"told {tell} (/ bound)" for tell in foresight)]
    lines = [f"**{result['trace']}**: {result['requests']:,} requests, working set "
             f"{result['unique_chunks']:,} chunks of {result['chunk_tokens']} tokens = "
             f"{result['working_set_bytes'] / gib:.1f} GiB; ideal {100 * result['ideal']:.1f}%", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        hit = row["hit"]
        cells = [row["capacity"], f"{row['tokens']:,}", f"{row['bytes'] / gib:.2f}",
                 *(f"{100 * hit[p]:.1f}%" for p in policies), f"{100 * row['bound']:.1f}%",
                 f"{hit[default] / row['bound']:.2f}" if row["bound"] else "-",
                 f"{100 * (hit[default] - hit['lru']):+.1f}" if "lru" in hit else "-"]
        for tell in foresight:
            told = row["foresight"][tell]
            cells.append(f"{100 * told:.1f}% ({told / row['bound']:.2f})" if row["bound"] else f"{100 * told:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def traces(paths: list[Path], each: bool) -> list[tuple[str, list[Path]]]:
    out: list[tuple[str, list[Path]]] = []
    for p in paths:
        out.append((p.name, [p]))
        if each and p.is_dir():
            out += [(f"{p.name}/{q.name}", [q]) for q in sorted(p.glob("*.json"))]
    return out


def run(args: argparse.Namespace) -> int:
    policies = parse_policies(args.policy, args.default)
    capacities = parse_capacities(args.g2, args.g2_g3)
    foresight = [t.strip() for t in args.foresight.split(",") if t.strip()]
    unknown = [t for t in foresight if t not in TELLS]
    if unknown:
        raise ConfigError(f"--foresight: unknown {unknown[0]!r}; known: {', '.join(TELLS)}")
    if not args.foresight_split_s > 0:
        raise ConfigError(f"--foresight-split-s must be > 0, got {args.foresight_split_s}")
    args.dram_gbps = args.disk_gbps = args.disk_latency_ms = args.remote_gbps = args.remote_latency_ms = None
    cost = cost_model(args)
    started, load_before = time.perf_counter(), os.getloadavg()
    results, tables = [], []
    try:
        seeds = [int(s) for s in args.synthetic.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--synthetic {args.synthetic!r}: expected seeds, e.g. 0,1,2") from None
    streams = [(name, partial(load_paths, files)) for name, files in traces(args.paths, args.each)]
    streams += [(f"synthetic agents, seed {seed}", partial(generate, AgentWorkload(seed=seed))) for seed in seeds]
    for name, load in streams:
        work = prepare(load())
        result = measure(name, work, cost, capacities, policies, foresight, args.foresight_split_s)
        results.append(result)
        tables.append(markdown(result, policies, args.default, foresight))
        print(tables[-1] + "\n", flush=True)
    accesses = sum(r["chunk_accesses"] * len(capacities) * len(policies) for r in results)
    sim_s = sum(r["speed"]["sim_s"] for r in results)
    runs = [row["chunk_accesses_per_s"][p] for r in results for row in r["rows"] for p in policies]
    speed = {"chunk_accesses_per_s": accesses / sim_s if sim_s else float("nan"), "sim_s": sim_s,
             "slowest_run_chunk_accesses_per_s": min(runs, default=float("nan")),
             "wall_s": time.perf_counter() - started, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
             "cpus": os.cpu_count()}
    ratios = [row["hit"][args.default] / row["bound"] for r in results for row in r["rows"] if row["bound"]]
    leads = [100 * (row["hit"][args.default] - row["hit"]["lru"]) for r in results for row in r["rows"]
             if "lru" in row["hit"]]
    summary = {"default": args.default, "min_ratio_to_bound": min(ratios, default=float("nan")),
               "min_lead_over_lru_pp": min(leads, default=float("nan"))}
    print(f"{args.default}: worst ratio to the bound {summary['min_ratio_to_bound']:.2f} (target 0.85), worst lead "
          f"over LRU {summary['min_lead_over_lru_pp']:+.1f} pp (target > -0.5); simulator "
          f"{speed['chunk_accesses_per_s']:,.0f} chunk accesses/s, slowest run "
          f"{speed['slowest_run_chunk_accesses_per_s']:,.0f}/s (load {load_before[0]:.1f} on "
          f"{os.cpu_count()} CPUs); TTFT figures: {cost.source}")
    doc = {"benchmark": "kvtier bench tight", "model": cost.shape.layout.model, "cost_model": cost.source,
           "policies": policies, "foresight": foresight, "foresight_split_s": args.foresight_split_s,
           "summary": summary, "speed": speed, "traces": results}
    report.write_outputs(args.json, doc, args.md, tables)
    return 0
