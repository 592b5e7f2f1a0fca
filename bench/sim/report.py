"""Metrics, tables, JSON and plots of simulate/live runs.

``metrics(run)`` turns one run's per-request arrays into the numbers the benchmark reports:
hit rate by tokens and by requests (overall and per tier), recomputed tokens, TTFT p50/p90/p99
(and with queueing), bytes read/written per tier, and the miss penalty by context length.
``print_table`` renders runs with ``rich``; ``write_json`` writes everything as data;
``plot_hit_rate`` / ``plot_ttft_cdf`` write the PNGs (matplotlib, Agg backend).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.sim.costmodel import CostModel
from bench.sim.sim import RunResult
from bench.sim.workloads.stream import StreamSummary

if TYPE_CHECKING:
    from rich.console import Console

CONTEXT_BUCKETS = (0, 8_192, 32_768, 131_072, 524_288, 1 << 62)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _bucket_name(lo: int, hi: int) -> str:
    def k(x: int) -> str:
        return f"{x // 1024}K"
    return f"{k(lo)}+" if hi >= 1 << 62 else f"{k(lo)}-{k(hi)}"


def context_distribution(summary: StreamSummary) -> dict[str, Any]:
    ctx = np.asarray(summary.context_tokens, dtype=np.int64)
    counts = np.histogram(ctx, bins=CONTEXT_BUCKETS)[0]
    return {
        "requests": summary.num_requests, "sessions": summary.num_sessions,
        "input_tokens": summary.input_tokens, "output_tokens": summary.output_tokens,
        "duration_s": summary.duration_s,
        "context_mean": float(ctx.mean()) if ctx.size else 0.0,
        "context_p50": float(np.percentile(ctx, 50)) if ctx.size else 0.0,
        "context_p90": float(np.percentile(ctx, 90)) if ctx.size else 0.0,
        "context_p99": float(np.percentile(ctx, 99)) if ctx.size else 0.0,
        "context_max": int(ctx.max()) if ctx.size else 0,
        "histogram": {_bucket_name(lo, hi): int(c)
                      for lo, hi, c in zip(CONTEXT_BUCKETS, CONTEXT_BUCKETS[1:], counts, strict=False)},
    }


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def metrics(run: RunResult, cost: CostModel) -> dict[str, Any]:
    ctx = run.context_tokens
    total = max(int(ctx.sum()), 1)
    hit = run.hit_total
    names = [t.name for t in run.tiers]
    out: dict[str, Any] = {
        "label": run.label, "policy": run.policy,
        "capacity": {t.name: t.capacity_bytes for t in run.tiers},
        "hit_rate_tokens": float(hit.sum() / total),
        "hit_rate_tokens_per_tier": {n: float(run.hit_tokens[:, i].sum() / total) for i, n in enumerate(names)},
        "hit_rate_requests": float((hit > 0).mean()) if hit.size else 0.0,
        "hit_rate_requests_per_tier": {n: float((run.hit_tokens[:, i] > 0).mean()) for i, n in enumerate(names)},
        "recomputed_tokens": int((ctx - hit).sum()),
        "ttft_p50_s": _pct(run.ttft_s, 50), "ttft_p90_s": _pct(run.ttft_s, 90), "ttft_p99_s": _pct(run.ttft_s, 99),
        "ttft_mean_s": float(run.ttft_s.mean()) if run.ttft_s.size else float("nan"),
        "tier_bytes": run.tier_bytes,
        "sim_wall_s": run.wall_s,
        "miss_penalty_by_context": miss_penalty(run, cost),
    }
    if run.queued_ttft_s is not None:
        q = run.queued_ttft_s
        out |= {"queued_ttft_p50_s": _pct(q, 50), "queued_ttft_p90_s": _pct(q, 90), "queued_ttft_p99_s": _pct(q, 99)}
    return out


def miss_penalty(run: RunResult, cost: CostModel) -> dict[str, dict[str, float]]:
    """Per context bucket: TTFT of a full miss minus a full G2 hit (model), and as observed.

    Observed = mean TTFT of the bucket's requests that hit under half their tokens minus those
    that hit at least half (NaN when either group is empty).
    """
    bpt = cost.shape.layout.bytes_per_token
    ratio = run.hit_total / np.maximum(run.context_tokens, 1)
    out = {}
    for lo, hi in itertools.pairwise(CONTEXT_BUCKETS):
        sel = (run.context_tokens >= lo) & (run.context_tokens < hi)
        if not sel.any():
            continue
        c = int(np.median(run.context_tokens[sel]))
        miss = cost.ttft_s(cached=0, new=c, bytes_per_tier={})
        full = cost.ttft_s(cached=c, new=0, bytes_per_tier={"dram": c * bpt})
        missed, hitted = sel & (ratio < 0.5), sel & (ratio >= 0.5)
        observed = (float(run.ttft_s[missed].mean() - run.ttft_s[hitted].mean())
                    if missed.any() and hitted.any() else float("nan"))
        out[_bucket_name(lo, hi)] = {"requests": int(sel.sum()), "median_context": c, "model_miss_s": miss,
                                     "model_g2_hit_s": full, "model_penalty_s": miss - full,
                                     "observed_penalty_s": observed}
    return out


def _g2(per_tier: dict[str, Any]) -> Any:
    """The G2 (DRAM) entry of a per-tier dict; the only entry for the reference runs."""
    return per_tier.get("dram", next(iter(per_tier.values()), 0))


def print_table(title: str, rows: Sequence[dict[str, Any]], baseline: dict[str, Any] | None = None) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("run", "G2 capacity", "hit % tok", "per tier %", "hit % req", "TTFT p50", "p90", "p99",
                "p50 speedup", "G2 read / written", "sim s"):
        table.add_column(col, justify="left" if col in ("run", "per tier %") else "right")
    base_p50 = baseline["ttft_p50_s"] if baseline else float("nan")
    for m in rows:
        tiers = " ".join(f"{n}={v * 100:.1f}" for n, v in m["hit_rate_tokens_per_tier"].items())
        g2 = m["tier_bytes"].get("dram")
        moved = f"{fmt_bytes(g2['bytes_read'])} / {fmt_bytes(g2['bytes_written'])}" if g2 else "-"
        cap = _g2(m["capacity"])
        table.add_row(m["label"], fmt_bytes(cap), f"{m['hit_rate_tokens'] * 100:.1f}", tiers,
                      f"{m['hit_rate_requests'] * 100:.1f}", f"{m['ttft_p50_s']:.3f}", f"{m['ttft_p90_s']:.3f}",
                      f"{m['ttft_p99_s']:.3f}", f"{base_p50 / m['ttft_p50_s']:.2f}x", moved, f"{m['sim_wall_s']:.2f}")
    _console().print(table)


def _console() -> Console:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_context(dist: dict[str, Any], penalty: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{dist['requests']}[/] requests, {dist['sessions']} sessions, "
                  f"{dist['input_tokens']:,} input tokens over {dist['duration_s']:.0f} s; context "
                  f"mean {dist['context_mean']:,.0f}, p50 {dist['context_p50']:,.0f}, p99 {dist['context_p99']:,.0f}, "
                  f"max {dist['context_max']:,}")
    table = Table(title="context length and miss penalty (model: full miss - full G2 hit)")
    for col in ("context", "requests", "median ctx", "TTFT miss s", "TTFT G2 hit s", "penalty s", "observed s"):
        table.add_column(col, justify="right")
    for name, p in penalty.items():
        table.add_row(name, str(p["requests"]), f"{p['median_context']:,}", f"{p['model_miss_s']:.3f}",
                      f"{p['model_g2_hit_s']:.3f}", f"{p['model_penalty_s']:.3f}", f"{p['observed_penalty_s']:.3f}")
    console.print(table)


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=float) + "\n", encoding="utf-8")


def write_outputs(json_path: Path | None, doc: dict[str, Any], md_path: Path | None, tables: Sequence[str]) -> None:
    """A benchmark's ``--json`` document and ``--md`` tables, each where asked (and said)."""
    if json_path:
        write_json(json_path, doc)
        print(f"wrote {json_path}")
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text("\n\n".join(tables) + "\n")
        print(f"wrote {md_path}")


def plot_hit_rate(path: str | Path, rows: Sequence[dict[str, Any]], ideal: float, title: str) -> None:
    """Hit rate (tokens) vs G2 capacity, one line per policy (G2's share dashed, all tiers solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(m["policy"] for m in rows):
        pts = sorted(((_g2(m["capacity"]), m) for m in rows if m["policy"] == policy), key=lambda p: p[0])
        xs = [p[0] / 2**30 for p in pts]
        name = "Belady MIN at G2 capacity" if policy == "belady" else policy
        line = ax.plot(xs, [p[1]["hit_rate_tokens"] * 100 for p in pts], marker="o", label=name)[0]
        if len(pts[0][1]["capacity"]) > 1:
            g2 = [_g2(p[1]["hit_rate_tokens_per_tier"]) * 100 for p in pts]
            ax.plot(xs, g2, linestyle="--", color=line.get_color(), label=f"{policy}: served by G2")
    ax.axhline(ideal * 100, color="black", linestyle=":", label="infinite cache")
    ax.set_xscale("log")
    ax.set_xlabel("G2 (DRAM) capacity, GiB")
    ax.set_ylabel("prefix hit rate, % of input tokens")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_cdf(path: str | Path, runs: Sequence[RunResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        x = np.sort(run.ttft_s)
        ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), label=run.label)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT, s (cost model)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
