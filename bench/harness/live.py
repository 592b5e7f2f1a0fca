"""Live mode: replay a request stream against a real engine's OpenAI-compatible endpoint.

Each request becomes ``POST {endpoint}/v1/completions`` with a *token-id* prompt, ``stream:
true`` and ``max_tokens = min(output_tokens, --max-output)``, sent at the trace's (scaled)
arrival time.  TTFT is the time from sending to the first streamed chunk that carries a choice;
end-to-end latency runs to ``[DONE]``.  A request that fails (server down, HTTP error, timeout)
is recorded with its error and never stops the replay.

Prompt tokens are synthesised from the chained block keys (``stream.block_keys``): block i of a
request is ``block_tokens`` ids drawn from ``numpy.random.default_rng(key_i)``, so equal hash-id
prefixes give equal token prefixes (what the engine's prefix cache and kvtier see), and
different ones differ.  Tokens past the last hash id (kv-cache-tester's partial tail) are
unique to the request.  Ids are in ``[100, vocab)`` to stay clear of special tokens.

Session ordering is the trace's: with ``--time-scale`` < 1 a turn may be sent before the
previous one of its session has finished (the "original timing" replay of kv-cache-tester).
If the server exposes vLLM's Prometheus counters (``/metrics``), the hit rates over the run of
its own prefix cache and of its KV connector (kvtier: "external" prefix cache) are read from them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from bench.sim.workloads.stream import Request, block_keys

MIN_TOKEN_ID = 100


def synthesize_tokens(request: Request, *, vocab: int = 32_000, max_tokens: int | None = None) -> list[int]:
    """Token ids for ``request``: equal (scope, hash-id prefix) -> equal tokens."""
    n = request.input_tokens if max_tokens is None else min(request.input_tokens, max_tokens)
    out: list[int] = []
    for key in block_keys(request):
        if len(out) >= n:
            break
        out += np.random.default_rng(key).integers(MIN_TOKEN_ID, vocab, size=request.block_tokens).tolist()
    if len(out) < n:  # tail past the hash ids: unique to this request
        seed = xxhash.xxh3_64_intdigest(f"{request.session}|{request.time_s!r}|tail".encode())
        out += np.random.default_rng(seed).integers(MIN_TOKEN_ID, vocab, size=n - len(out)).tolist()
    return out[:n]


@dataclass(frozen=True, slots=True)
class LiveResult:
    index: int  # position in the replayed stream
    input_tokens: int  # prompt tokens sent
    send_lag_s: float  # sent this late after its scheduled time (client saturated)
    ttft_s: float  # NaN on error
    e2e_s: float  # NaN on error
    chunks: int  # streamed chunks with a choice (~ output tokens)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Streamed:
    """One streamed completion, times from ``time.perf_counter()``."""

    sent: float  # when the request was sent
    token_times: tuple[float, ...]  # arrival of every streamed token ("return_token_ids"), else of every chunk
    token_ids: tuple[int, ...]  # generated ids (only when the body asks for "return_token_ids")

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def e2e_s(self) -> float:
        return self.token_times[-1] - self.sent


def stream_completion(url: str, body: dict[str, Any], timeout_s: float) -> Streamed:
    """POST one streaming completion and time each chunk; raises if no token came back."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    times: list[float] = []
    ids: list[int] = []
    per_token = bool(body.get("return_token_ids"))
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            msg = json.loads(payload)
            if msg.get("choices"):
                now = time.perf_counter()
                got = msg["choices"][0].get("token_ids") or []
                ids += got
                # a loaded server may stream several tokens in one chunk: each arrived now
                times += [now] * (len(got) if per_token else 1)
    if not times:
        raise RuntimeError("stream ended without a token")
    return Streamed(start, tuple(times), tuple(ids))


def _post_stream(url: str, body: dict[str, Any], timeout_s: float) -> tuple[float, float, int]:
    """Send one streaming completion; returns (ttft, e2e, chunks) measured from the send."""
    s = stream_completion(url, body, timeout_s)
    return s.ttft_s, s.e2e_s, len(s.token_times)


def served_model(endpoint: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(f"{endpoint.rstrip('/')}/v1/models", timeout=timeout_s) as resp:
        return str(json.load(resp)["data"][0]["id"])


def prefix_cache_counters(endpoint: str) -> dict[str, float]:
    """vLLM's prefix-cache query/hit counters from ``/metrics`` ({} if the server has none)."""
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for name in ("prefix_cache_queries", "prefix_cache_hits",  # the engine's own (GPU) prefix cache
                 "external_prefix_cache_queries", "external_prefix_cache_hits"):  # a KV connector's (kvtier)
        values = re.findall(rf"^vllm:{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        if values:
            out[name] = sum(float(v) for v in values)
    return out


def replay_live(requests: Sequence[Request], endpoint: str, *, model: str, max_output: int = 16,
                concurrency: int = 64, vocab: int = 32_000, max_context: int | None = None,
                timeout_s: float = 600.0) -> list[LiveResult]:
    """Send every request at its ``time_s`` (relative to now); one result per request, in order."""
    url = f"{endpoint.rstrip('/')}/v1/completions"
    results: list[LiveResult | None] = [None] * len(requests)
    gate = threading.Semaphore(concurrency)

    def one(i: int, r: Request, prompt: list[int], due: float) -> None:
        try:
            lag = time.perf_counter() - due
            body = {"model": model, "prompt": prompt, "max_tokens": max(1, min(r.output_tokens, max_output)),
                    "stream": True, "temperature": 0.0, "ignore_eos": True}
            try:
                ttft, e2e, chunks = _post_stream(url, body, timeout_s)
                results[i] = LiveResult(i, len(prompt), lag, ttft, e2e, chunks)
            except (OSError, urllib.error.URLError, ValueError, RuntimeError) as exc:
                results[i] = LiveResult(i, len(prompt), lag, math.nan, math.nan, 0, f"{type(exc).__name__}: {exc}")
        finally:
            gate.release()

    t0 = time.perf_counter() - (requests[0].time_s if requests else 0.0)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvtier-live") as pool:
        for i, r in enumerate(requests):
            prompt = synthesize_tokens(r, vocab=vocab, max_tokens=max_context)
            due = t0 + r.time_s
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            gate.acquire()
            pool.submit(one, i, r, prompt, due)
    return [r for r in results if r is not None]


def run_live(requests: Sequence[Request], args: argparse.Namespace, *, title: str) -> int:
    from bench.sim import report
    from bench.sim.sim import ideal as ideal_run
    from bench.sim.sim import prepare
    from bench.trace import cost_model

    endpoint = args.endpoint
    model = args.served_model or served_model(endpoint)
    before = prefix_cache_counters(endpoint)
    started = time.perf_counter()
    results = replay_live(requests, endpoint, model=model, max_output=args.max_output,
                          concurrency=args.concurrency, vocab=args.vocab, max_context=args.max_context)
    wall = time.perf_counter() - started
    after = prefix_cache_counters(endpoint)
    ok = [r for r in results if r.error is None]
    ttft = np.array([r.ttft_s for r in ok])
    # Which requests an infinite cache would mostly hit: the observed miss penalty splits on it.
    reference = ideal_run(prepare(requests), cost_model(args))
    ratio = reference.hit_total / np.maximum(reference.context_tokens, 1)
    by_bucket: dict[str, dict[str, float]] = {}
    ctx = np.array([r.input_tokens for r in results])
    ttft_all = np.array([r.ttft_s for r in results])
    for lo, hi in itertools.pairwise(report.CONTEXT_BUCKETS):
        sel = (ctx >= lo) & (ctx < hi) & ~np.isnan(ttft_all)
        if sel.any():
            miss, hit = ttft_all[sel & (ratio < 0.5)], ttft_all[sel & (ratio >= 0.5)]
            by_bucket[f"{lo // 1024}K+"] = {
                "requests": int(sel.sum()), "ttft_p50_s": float(np.median(ttft_all[sel])),
                "ttft_cold_mean_s": float(miss.mean()) if miss.size else math.nan,
                "ttft_warm_mean_s": float(hit.mean()) if hit.size else math.nan}
    doc: dict[str, Any] = {
        "benchmark": "kvtier bench", "title": title, "mode": "live", "endpoint": endpoint, "model": model,
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
        "ttft_p50_s": report._pct(ttft, 50), "ttft_p90_s": report._pct(ttft, 90), "ttft_p99_s": report._pct(ttft, 99),
        "ideal_hit_rate_tokens": float(reference.hit_total.sum() / max(int(reference.context_tokens.sum()), 1)),
        "ttft_by_context": by_bucket,
        "engine_prefix_cache": {k: after[k] - before.get(k, 0.0) for k in after},
        "first_errors": [r.error for r in results if r.error][:5],
    }
    q = doc["engine_prefix_cache"]
    if q.get("prefix_cache_queries"):
        doc["engine_prefix_hit_rate"] = q.get("prefix_cache_hits", 0.0) / q["prefix_cache_queries"]
    if q.get("external_prefix_cache_queries"):
        doc["connector_hit_rate"] = q.get("external_prefix_cache_hits", 0.0) / q["external_prefix_cache_queries"]
    print(json.dumps({k: v for k, v in doc.items() if k != "ttft_by_context"}, indent=2, default=float))
    if args.json:
        doc["results"] = [asdict(r) for r in results]
        report.write_json(args.json, doc)
    if args.plot_dir and ok:
        import dataclasses as dc

        args.plot_dir.mkdir(parents=True, exist_ok=True)
        shown = dc.replace(reference, label=f"live {model}", ttft_s=ttft)
        report.plot_ttft_cdf(args.plot_dir / "ttft_cdf_live.png", [shown], f"{title} (live)")
    return 0 if ok else 1
