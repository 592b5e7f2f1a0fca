"""The concurrent vLLM bench's own logic: trace scaling, session timing, closed-loop replay,
percentiles and inter-token gaps, and the single-request bench's engine grouping.

The replay tests use a stand-in ``send`` (it sleeps and returns token times) because what they
check is our scheduling, not an engine; tests/bench/test_vllm_concurrent.py runs real vLLM.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.harness.live import Streamed, synthesize_tokens
from bench.harness.sessions import (
    Session,
    Turn,
    TurnResult,
    agent_hints,
    inter_token_gaps,
    kvtester_requests,
    percentile,
    replay_sessions,
    scale_session,
    summarize,
    synthetic_requests,
    to_sessions,
)
from bench.sim.workloads.stream import Request
from bench.vllm import ROLES, plan_groups, select_roles
from kvtier.errors import ConfigError


def _req(t: float, ids: tuple[int, ...], n: int, session: str = "s", block: int = 64) -> Request:
    return Request(time_s=t, session=session, scope=f"scope:{session}", hash_ids=ids, block_tokens=block,
                   input_tokens=n, output_tokens=4)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)  # linear interpolation
    assert percentile([5.0], 90) == 5.0
    assert math.isnan(percentile([], 50))


def test_scaling_shrinks_blocks_and_keeps_the_prefix_structure() -> None:
    turns = [_req(0, tuple(range(1, 101)), 6400), _req(1, (*range(1, 101), 7, 8), 6500),
             _req(2, (*range(1, 51), 99, 98), 3300)]  # the last one shares only 50 blocks
    scaled = scale_session(turns, max_context=1000)
    assert all(r.block_tokens == 9 for r in scaled)  # 64 * 1000 // 6500
    assert [r.input_tokens for r in scaled] == [900, 915, 465]  # ceil(input * 9 / 64)
    a, b, c = (synthesize_tokens(r, vocab=2048) for r in scaled)
    assert _shared_prefix(a, b) == 900  # b extends a
    assert _shared_prefix(a, c) == 450  # 50 shared blocks of 9 tokens
    assert scale_session(turns[:1], max_context=10_000) == turns[:1]  # fits: unchanged
    # under one token per block: every 5 blocks (64 * 100 / 32000 = 0.2 tokens each) become one
    long, fork = _req(0, tuple(range(500)), 32_000), _req(1, (*range(250), *range(1000, 1250)), 32_000)
    x, y = scale_session([long, fork], max_context=100)
    assert x.block_tokens == 1 and (x.input_tokens, y.input_tokens) == (100, 100)
    assert _shared_prefix(synthesize_tokens(x), synthesize_tokens(y)) == 50  # 250 shared blocks / 5


def test_to_sessions_timing() -> None:
    reqs = [_req(0, (1,), 64, "a"), _req(10, (1, 2), 128, "a"), _req(500, (1, 2, 3), 192, "a"),
            _req(3, (5,), 64, "b"), _req(4, (5, 6), 128, "b"), _req(5, (5, 6, 7), 192, "b")]
    sessions = to_sessions(reqs, turns=2, max_context=4096, time_scale=0.1, max_gap_s=2.0, stagger_s=0.5)
    assert [s.name for s in sessions] == ["a", "b"]
    assert [s.start_s for s in sessions] == [0.0, 0.5]
    assert [len(s.turns) for s in sessions] == [2, 2]  # first two turns only
    assert [t.gap_s for t in sessions[0].turns] == [0.0, 1.0]
    assert [t.gap_s for t in sessions[1].turns] == [0.0, pytest.approx(0.1)]
    capped = to_sessions(reqs, turns=3, max_context=4096, time_scale=1.0, max_gap_s=2.0)
    assert [t.gap_s for t in capped[0].turns] == [0.0, 2.0, 2.0]
    with pytest.raises(ConfigError):
        to_sessions(reqs, turns=0, max_context=4096)


def test_synthetic_sessions_fit_the_context() -> None:
    reqs = synthetic_requests(sessions=3, turns=5, max_context=1024, seed=1)
    sessions = to_sessions(reqs, turns=5, max_context=1024)
    assert len(sessions) == 3 and all(len(s.turns) == 5 for s in sessions)
    assert max(t.request.input_tokens for s in sessions for t in s.turns) <= 1024
    prompts = [synthesize_tokens(s.turns[0].request, vocab=2048) for s in sessions]
    assert _shared_prefix(prompts[0], prompts[1]) >= 256 - 64  # the shared system prompt (a quarter)


def test_kvtester_sessions_repeat_conversations_in_fresh_scopes(shared_traces: Path) -> None:
    paths = sorted((shared_traces / "kv-cache-tester").glob("*.json"))
    reqs = kvtester_requests(paths, sessions=len(paths) + 1)
    sessions = to_sessions(reqs, turns=4, max_context=2048, time_scale=0.01)
    assert len(sessions) == len(paths) + 1
    first, again = sessions[0], sessions[len(paths)]  # the same conversation twice
    assert first.name.split("#")[0] == again.name.split("#")[0]
    assert first.turns[0].request.scope != again.turns[0].request.scope
    assert max(t.request.input_tokens for s in sessions for t in s.turns) <= 2048
    a, b = (synthesize_tokens(t.request) for t in first.turns[:2])
    assert _shared_prefix(a, b) > len(a) // 2  # consecutive agent turns share most of the context
    assert _shared_prefix(a, synthesize_tokens(again.turns[0].request)) == 0


def test_replay_is_closed_loop_per_session() -> None:
    """Turn k+1 goes out its gap after turn k's answer; sessions overlap; failures are recorded."""
    service_s = 0.15
    sent: dict[str, list[float]] = {}
    lock = threading.Lock()

    def send(url: str, body: dict[str, Any], timeout_s: float) -> Streamed:
        start = time.perf_counter()
        if body["prompt"][0] == -1:
            raise OSError("boom")
        with lock:
            sent.setdefault(str(body["prompt"][:4]), []).append(start)
        time.sleep(service_s)
        return Streamed(start, (start + service_s / 2, start + service_s), ())

    def session(name: str, start: float, gaps: list[float]) -> Session:
        return Session(name, start, tuple(Turn(_req(0, (i,), 64, name), g) for i, g in enumerate(gaps)))

    sessions = [session("a", 0.0, [0.0, 0.2, 0.2]), session("b", 0.1, [0.0, 0.0])]
    results, wall = replay_sessions(sessions, "http://127.0.0.1:9", model="m", send=send)
    assert len(results) == 5 and all(r.error is None for r in results)
    a = [r for r in results if r.session == "a"]
    b = [r for r in results if r.session == "b"]
    assert a[0].sent_s < 0.05 and 0.1 <= b[0].sent_s < 0.15
    for prev, nxt in itertools.pairwise(a):
        assert nxt.sent_s >= prev.token_times_s[-1] + 0.2  # closed loop: answer, then the gap
    assert b[1].sent_s >= b[0].token_times_s[-1]
    assert b[0].sent_s < a[0].token_times_s[-1]  # b's first turn overlaps a's
    assert wall >= 3 * service_s + 0.4
    assert all(r.ttft_s == pytest.approx(service_s / 2, abs=0.02) for r in results)

    def failing(url: str, body: dict[str, Any], timeout_s: float) -> Streamed:
        raise OSError("connection refused")

    bad, _ = replay_sessions(sessions[:1], "http://127.0.0.1:9", model="m", send=failing)
    assert len(bad) == 3 and all(r.error and "refused" in r.error for r in bad)
    assert all(math.isnan(r.ttft_s) for r in bad)


def test_replay_sends_the_agent_hints_of_the_trace(shared_traces: Path) -> None:
    """With ``hints`` every turn carries ``kv_transfer_params['kvtier']``: its session, and
    ``awaits`` from the trace's stop reason (``tool_use`` -> "tool", ``end_turn`` -> "user"),
    which kvtier's connector reads (``request_hints``) to prefetch during the pause; without
    ``hints`` the body has no ``kv_transfer_params``."""
    from kvtier.integrations.vllm_plan import request_hints

    paths = sorted((shared_traces / "kv-cache-tester").glob("*.json"))
    sessions = to_sessions(kvtester_requests(paths, sessions=2), turns=6, max_context=1024)
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send(url: str, body: dict[str, Any], timeout_s: float) -> Streamed:
        with lock:
            bodies.append(body)
        now = time.perf_counter()
        return Streamed(now, (now,), ())

    fast = [Session(s.name, 0.0, tuple(Turn(t.request, 0.0) for t in s.turns)) for s in sessions]
    replay_sessions(fast, "http://127.0.0.1:9", model="m", hints=True, send=send)
    assert len(bodies) == 12
    expected = {(s.name, str(synthesize_tokens(t.request)[:32]), t.request.awaits) for s in fast for t in s.turns}
    got = set()
    for body in bodies:
        spec = body["kv_transfer_params"]["kvtier"]
        got.add((spec["session"], str(body["prompt"][:32]), spec.get("awaits")))
        hints, problems = request_hints(type("R", (), {"kv_transfer_params": body["kv_transfer_params"]})())
        assert not problems and hints.session == spec["session"] and hints.awaits == spec.get("awaits")
    assert got == expected
    awaits = [t.request.awaits for s in fast for t in s.turns]
    assert "tool" in awaits and set(awaits) <= {"tool", "user"}  # the traces say what each answer waits for
    assert agent_hints(fast[0], fast[0].turns[0]) == {"kvtier": {"session": fast[0].name,
                                                                 "awaits": fast[0].turns[0].request.awaits}}
    quiet = Session("q", 0.0, (Turn(_req(0, (1,), 64, "q"), 0.0),))
    assert agent_hints(quiet, quiet.turns[0]) == {"kvtier": {"session": "q"}}  # awaits not known: not said

    bodies.clear()
    replay_sessions(fast[:1], "http://127.0.0.1:9", model="m", send=send)
    assert len(bodies) == 6 and not any("kv_transfer_params" in b for b in bodies)


def test_inter_token_gaps_during_loads_and_summary() -> None:
    decoding = TurnResult("a", 0, 100, 0.0, (0.1, 0.2, 0.5, 0.6))  # gaps 0.1, 0.3, 0.1
    waiting = TurnResult("b", 0, 100, 0.25, (0.45, 0.46))  # waits for its first token over 0.25-0.45
    every, during = inter_token_gaps([decoding, waiting])
    assert every == pytest.approx([0.1, 0.3, 0.1, 0.01])
    assert during == pytest.approx([0.3])  # only a's 0.2-0.5 gap overlaps b's wait
    failed = TurnResult("c", 0, 100, 0.3, (), "HTTPError")
    s = summarize([decoding, waiting, failed], wall_s=1.0)
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["ttft_p50_s"] == pytest.approx(0.15)
    assert s["requests_per_s"] == pytest.approx(2 / 0.6)
    assert s["itl_during_loads_p90_s"] == pytest.approx(0.3) and s["itl_during_loads_samples"] == 1


def test_single_request_engine_groups() -> None:
    groups = plan_groups(ROLES, 2)
    assert [[r.name for r in g] for g in groups] == [
        ["recompute", "kvtier"], ["kvtier-fresh", "lmcache"], ["example", "lmcache-fresh"]]
    for g in plan_groups(ROLES, 6):  # a fresh process never runs beside the one whose disk it reads
        names = {r.name for r in g}
        assert not any(r.after in names for r in g)
    assert [r.name for r in select_roles("kvtier-disk", lmcache_ok=True)] == ["recompute", "kvtier", "kvtier-fresh"]
    assert "lmcache" not in [r.name for r in select_roles(None, lmcache_ok=False)]
    with pytest.raises(SystemExit):
        select_roles("nope", lmcache_ok=True)


def test_prefetch_modes_differ_only_in_prefetch(tmp_path: Path) -> None:
    """kvtier-noprefetch and kvtier-prefetch: the same engine and kvtier config but
    ``prefetch.dram_share`` (0 vs ``--prefetch-share``), each run on a disk tier of its own;
    ``aggregate`` takes medians over rounds and keeps each round's TTFTs."""
    from bench.concurrent import aggregate, mode_spec

    base = {"model": tmp_path / "m", "cpu_bind": "0-1", "prefix_caching": True, "block_size": 32}
    off, on = (mode_spec(m, base, tmp_path, tag=f"t-{m}", chunk=64, dram_mib=8, prefetch_share=0.5)
               for m in ("kvtier-noprefetch", "kvtier-prefetch"))
    assert off.extra_config.pop("prefetch") == {"dram_share": 0.0}
    assert on.extra_config.pop("prefetch") == {"dram_share": 0.5}
    assert off.extra_config["disk"]["path"] != on.extra_config["disk"]["path"]
    assert off.extra_config["stats_file"] != on.extra_config["stats_file"]
    strip = {"disk": None, "stats_file": None}
    assert {**off.extra_config, **strip} == {**on.extra_config, **strip}
    assert off.connector == on.connector == "kvtier"
    assert "prefetch" not in mode_spec("kvtier", base, tmp_path, tag="k", chunk=64, dram_mib=8,
                                       prefetch_share=0.5).extra_config  # kvtier's default

    runs = [{"mode": "m", "errors": e, "ttft_p50_s": p50, "ttft_p90_s": 2 * p50, "prefetch": {"prefetch_chunks": c}}
            for e, p50, c in ((0, 0.1, 4), (1, 0.3, 8), (0, 0.2, 6))]
    agg = aggregate(runs)
    assert agg["ttft_p50_s"] == pytest.approx(0.2) and agg["ttft_p90_s"] == pytest.approx(0.4)
    assert agg["prefetch"] == {"prefetch_chunks": 6.0} and agg["errors"] == 1 and agg["rounds"] == 3
    assert agg["ttft_p50_s_runs"] == [0.1, 0.3, 0.2] and agg["mode"] == "m"
    assert aggregate(runs[:1]) is runs[0]
