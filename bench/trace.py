"""Replay real traces (Mooncake JSONL, kv-cache-tester JSON) through the hierarchy or an engine.

    kvtier bench trace ../shared/traces/mooncake_synthetic_trace.jsonl --dram 5%,10%,25% --disk 50%
    kvtier bench trace ../shared/traces/kv-cache-tester/ --policy lru,s3fifo --json out.json --plot-dir out/
    kvtier bench trace trace.jsonl --mode live --endpoint http://127.0.0.1:8000 --time-scale 0.1

Paths may be files or folders (every ``*.json``/``*.jsonl`` inside); a folder of kv-cache-tester
conversations replays as that many concurrent sessions.  Capacities are sizes (``4GiB``) or a
percentage of the trace's working set (``10%``: unique chunks x chunk bytes).  Every run is
compared in the same run against no cache (the recompute baseline, for the TTFT speedup), the
infinite-cache ideal and Belady's MIN at the same G2 capacity.  ``replay`` is shared with
``kvtier bench agentic``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.sim import report
from bench.sim.costmodel import CostModel, Link, measured, model_shape, newest_measured
from bench.sim.sim import Progress, RunResult, TierSpec, belady, ideal, prepare, simulate
from bench.sim.workloads.kvtester import load_kvtester_dir
from bench.sim.workloads.mooncake import load_mooncake
from bench.sim.workloads.stream import Request, merge, summarize
from kvtier.config import parse_size
from kvtier.errors import ConfigError
from kvtier.policy.registry import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="trace files or folders")
    parser.add_argument("--format", choices=("auto", "mooncake", "kvtester"), default="auto",
                        help="trace format (auto: .jsonl = Mooncake, .json = kv-cache-tester)")
    parser.add_argument("--limit", type=int, default=None, help="first N requests of each Mooncake file")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="kv-cache-tester: conversation i starts at i x STAGGER seconds")
    parser.add_argument("--repeat", type=int, default=1,
                        help="replay the stream N times back to back as fresh sessions (scale test)")
    add_replay_arguments(parser)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replay")
    g.add_argument("--mode", choices=("simulate", "live"), default="simulate")
    g.add_argument("--model", default="llama-3.1-8b",
                   help="model shape: llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, deepseek-v3, or "
                        "custom:layers=L,kv_heads=H,head_dim=D,q_heads=Q,params=P")
    g.add_argument("--chunk-blocks", type=int, default=1, help="trace blocks per kvtier chunk")
    g.add_argument("--dram", default="5%,10%,25%", help="G2 capacities to sweep: sizes or %% of working set")
    g.add_argument("--disk", default=None, help="G3 disk capacity (size or %% of working set); none by default")
    g.add_argument("--remote", default=None, help="G4 shared capacity (size or %%); none by default")
    g.add_argument("--hbm", default=None, help="a G1 GPU prefix cache above G2 (size or %%); none by default")
    g.add_argument("--policy", default="lru,lru-prefix,s3fifo,agent", help=f"eviction policies, of {sorted(POLICIES)}")
    g.add_argument("--promotion", choices=("always", "never"), default="always")
    g.add_argument("--no-write-through", action="store_true", help="do not copy new chunks to disk/remote")
    g.add_argument("--no-belady", action="store_true", help="skip the Belady reference")
    g.add_argument("--replicas", type=int, default=0, help="GPUs to queue on (0: no queueing in TTFT)")
    g.add_argument("--time-scale", type=float, default=1.0, help="multiply trace times (0.5 = twice as fast)")
    g.add_argument("--cost-model", default="auto",
                   help="TTFT figures: a cost-model JSON, 'newest' (the newest H200 run in "
                        "benchmarks/gpu/results), 'modelled' (FLOPs and the link flags), or 'auto' "
                        "(newest if found, else modelled)")
    g.add_argument("--gpu-flops", type=float, default=5.7e14, help="effective prefill FLOP/s (modelled)")
    g.add_argument("--dram-gbps", type=float, default=None, help="override the DRAM link")
    g.add_argument("--disk-gbps", type=float, default=None, help="override the disk link")
    g.add_argument("--disk-latency-ms", type=float, default=None)
    g.add_argument("--remote-gbps", type=float, default=None, help="override the remote link")
    g.add_argument("--remote-latency-ms", type=float, default=None)
    g.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    g.add_argument("--plot-dir", type=Path, default=None, help="write hit-rate and TTFT-CDF PNGs here")
    g.add_argument("--no-progress", action="store_true")
    lv = parser.add_argument_group("live mode")
    lv.add_argument("--endpoint", default="http://127.0.0.1:8000", help="OpenAI-compatible server")
    lv.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    lv.add_argument("--max-output", type=int, default=16, help="cap on output tokens per request")
    lv.add_argument("--max-context", type=int, default=None, help="truncate prompts to this many tokens")
    lv.add_argument("--concurrency", type=int, default=64, help="most requests in flight")
    lv.add_argument("--vocab", type=int, default=32_000, help="synthesised token ids are below this")


def load_paths(paths: Sequence[Path], fmt: str = "auto", *, limit: int | None = None,
               stagger_s: float = 0.0) -> list[Request]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".json", ".jsonl"))
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError(f"no such trace: {p}")
    if not files:
        raise ConfigError(f"no trace files in {[str(p) for p in paths]}")
    mooncake = [f for f in files if fmt == "mooncake" or (fmt == "auto" and f.suffix == ".jsonl")]
    kvtester = [f for f in files if f not in mooncake]
    streams = [load_mooncake(f, limit=limit) for f in mooncake]
    if kvtester:
        streams.append(load_kvtester_dir(kvtester, stagger_s=stagger_s))
    return merge(streams)


def repeat(requests: Sequence[Request], times: int) -> list[Request]:
    """``times`` back-to-back copies with fresh scopes and sessions (no sharing across copies)."""
    if times <= 1:
        return list(requests)
    span = (requests[-1].time_s - requests[0].time_s) + 1.0 if requests else 0.0
    return [dataclasses.replace(r, time_s=r.time_s + k * span, scope=f"{r.scope}~{k}", session=f"{r.session}~{k}")
            for k in range(times) for r in requests]


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
    requests = repeat(load_paths(args.paths, args.format, limit=args.limit, stagger_s=args.stagger), args.repeat)
    return replay(requests, args, title=", ".join(p.name for p in args.paths))


# --- the shared replay harness --------------------------------------------------------------------
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "results"  # bench/ is in a checkout


def cost_model(args: argparse.Namespace) -> CostModel:
    shape = model_shape(args.model)
    choice = getattr(args, "cost_model", "modelled")
    if choice in ("newest", "auto") and (choice == "newest" or any(RESULTS.glob("h200_run*cost_model.json"))):
        base = newest_measured(RESULTS, shape)
    elif choice in ("modelled", "auto"):
        base = CostModel(shape=shape, gpu_flops=args.gpu_flops)
    else:
        base = measured(choice, shape)
    links = dict(base.links)
    for name, gbps, ms in (("dram", args.dram_gbps, None), ("disk", args.disk_gbps, args.disk_latency_ms),
                           ("remote", args.remote_gbps, args.remote_latency_ms)):
        if gbps is not None or ms is not None:
            old = links[name]
            links[name] = Link(bandwidth_Bps=gbps * 1e9 if gbps is not None else old.bandwidth_Bps,
                               latency_s=ms / 1e3 if ms is not None else old.latency_s)
    return dataclasses.replace(base, links=links)


def capacity(spec: str, working_set: int) -> int:
    spec = spec.strip()
    if spec.endswith("%"):
        try:
            return int(working_set * float(spec[:-1]) / 100)
        except ValueError:
            raise ConfigError(f"bad capacity {spec!r}") from None
    return parse_size(spec)


def replay(requests: Sequence[Request], args: argparse.Namespace, *, title: str) -> int:
    if args.time_scale <= 0 or args.replicas < 0 or args.concurrency < 1 or args.max_output < 1:
        raise ConfigError("--time-scale must be > 0, --replicas >= 0, --concurrency and --max-output >= 1")
    if args.time_scale != 1.0:
        requests = [dataclasses.replace(r, time_s=r.time_s * args.time_scale) for r in requests]
    if args.mode == "live":
        from bench.harness.live import run_live

        return run_live(requests, args, title=title)
    cost = cost_model(args)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise ConfigError(f"unknown policy {p!r}; known: {sorted(POLICIES)}")
    work = prepare(requests, chunk_blocks=args.chunk_blocks)
    chunk_bytes = cost.shape.layout.bytes_per_token * work.chunk_tokens
    working_set = work.unique_chunks * chunk_bytes
    drams = [capacity(s, working_set) for s in args.dram.split(",") if s.strip()]
    lower = [TierSpec(name=n, capacity_bytes=capacity(v, working_set), persistent=True)
             for n, v in (("disk", args.disk), ("remote", args.remote)) if v]
    upper = [TierSpec(name="hbm", capacity_bytes=capacity(args.hbm, working_set))] if args.hbm else []
    summary = summarize(work.requests)
    report.print_context(report.context_distribution(summary), {})
    print(f"{cost.shape.layout.model}: {work.chunk_tokens}-token chunks of {report.fmt_bytes(chunk_bytes)}; "
          f"working set {work.unique_chunks:,} chunks = {report.fmt_bytes(working_set)}; "
          f"{work.total_chunk_accesses:,} chunk accesses")
    print(f"TTFT: fetch-or-recompute with figures from {cost.source}")

    n_sims = len(drams) * len(policies)
    runs: list[RunResult] = []
    started = time.perf_counter()
    with _progress(n_sims * len(work.requests), args.no_progress) as advance:
        nocache = belady(work, cost, 0, replicas=args.replicas, label="no cache")
        best = ideal(work, cost, replicas=args.replicas)
        for dram in drams:
            if not args.no_belady:
                runs.append(belady(work, cost, dram, replicas=args.replicas,
                                   label=f"belady G2={report.fmt_bytes(dram)}"))
                if lower:  # the bound for hits from any tier: MIN over all the capacity there is
                    everything = dram + sum(t.capacity_bytes for t in lower)
                    run_all = belady(work, cost, everything, replicas=args.replicas,
                                     label=f"belady all={report.fmt_bytes(everything)}")
                    run_all.policy = "belady-all"
                    runs.append(run_all)
            for policy in policies:
                specs = [*upper, TierSpec(name="dram", capacity_bytes=dram), *lower]
                runs.append(simulate(work, cost, specs, policy=policy, promotion=args.promotion,
                                     write_through=not args.no_write_through, replicas=args.replicas,
                                     progress=advance, label=f"{policy} G2={report.fmt_bytes(dram)}"))
    sim_wall = time.perf_counter() - started
    sims = [r for r in runs if r.policy in POLICIES]
    sim_s = sum(r.wall_s for r in sims)
    speed = {"runs": len(sims), "sim_wall_s": sim_s,
             "requests_per_s": len(sims) * len(work.requests) / sim_s if sim_s else float("nan"),
             "tokens_per_s": len(sims) * summary.input_tokens / sim_s if sim_s else float("nan"),
             "chunk_accesses_per_s": len(sims) * work.total_chunk_accesses / sim_s if sim_s else float("nan")}
    rows = [report.metrics(r, cost) for r in (nocache, best, *runs)]
    report.print_context(report.context_distribution(summary), rows[1]["miss_penalty_by_context"])
    report.print_table(f"{title}: {len(work.requests):,} requests, {cost.shape.layout.model}"
                       + (f", +{' +'.join(f'{t.name} {report.fmt_bytes(t.capacity_bytes)}' for t in lower)}"
                          if lower else ""), rows, baseline=rows[0])
    print(f"simulator: {speed['requests_per_s']:,.0f} requests/s, {speed['tokens_per_s']:,.0f} tokens/s, "
          f"{speed['chunk_accesses_per_s']:,.0f} chunk accesses/s over {len(sims)} runs "
          f"({sim_wall:.1f} s wall incl. references)")
    doc: dict[str, Any] = {
        "benchmark": "kvtier bench", "title": title, "mode": "simulate", "model": cost.shape.layout.model,
        "chunk_tokens": work.chunk_tokens, "chunk_bytes": chunk_bytes, "working_set_bytes": working_set,
        "unique_chunks": work.unique_chunks, "cost_model": {
            "source": cost.source, "gpu_flops": cost.gpu_flops, "stages": cost.stages,
            "prefill": dataclasses.asdict(cost.prefill_cost()),
            "links": {k: dataclasses.asdict(v) for k, v in cost.links.items()}},
        "workload": report.context_distribution(summary), "speed": speed,
        "baseline_no_cache": rows[0], "ideal": rows[1], "runs": rows[2:],
    }
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        report.plot_hit_rate(args.plot_dir / "hit_rate_vs_g2.png", [m for m in rows[2:] if m["policy"] != "belady-all"],
                             rows[1]["hit_rate_tokens"], title)
        mid = drams[len(drams) // 2]
        cdf_runs = [nocache, best, *(r for r in runs if r.tiers and any(
            t.name == "dram" and t.capacity_bytes == mid for t in r.tiers))]
        report.plot_ttft_cdf(args.plot_dir / "ttft_cdf.png", cdf_runs, f"{title} (G2={report.fmt_bytes(mid)})")
        print(f"wrote {args.plot_dir}/hit_rate_vs_g2.png, ttft_cdf.png")
    return 0


class _progress:
    """A rich progress bar over simulated requests (silent when disabled)."""

    def __init__(self, total: int, disabled: bool) -> None:
        self.total, self.disabled = total, disabled

    def __enter__(self) -> Progress | None:
        if self.disabled:
            return None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("simulating", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if not self.disabled:
            self._bar.__exit__(None, None, None)
