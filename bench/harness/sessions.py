"""Agent sessions replayed live against an engine: built from a workload, scaled, closed-loop.

Sources: the synthetic agent workload (``workloads.synthetic``, sized by ``max_context``) or
the kv-cache-tester traces (anonymised Claude Code conversations, 50K-200K-token contexts).
Session i of a trace replays conversation ``i mod len(files)`` under a scope of its own, so
repeated conversations share no KV (their ids are per conversation); sub-agent calls are left
out (only a conversation's own turns run, in order).

Scaling, so that a 2-core CPU replays N sessions in minutes:

* turns: the first ``turns`` calls of each session;
* context: a session whose largest input exceeds ``max_context`` is shrunk by one factor
  ``f = max_context / largest`` for all its turns: each block keeps ``floor(block_tokens * f)``
  tokens, or, when that is under one token, every ``ceil(1 / (block_tokens * f))`` consecutive
  blocks become one 1-token block named by the group's last id.  Inputs become
  ``ceil(input * f')`` tokens (``f'`` the factor actually applied, <= f).  Two turns that share
  their first m blocks still share the first m (or floor(m / group)) scaled blocks, so the
  prefix structure (which turn shares how much with which) is the trace's.

Timing is closed-loop per session, as an agent runs: turn k+1 is sent ``gap_s`` after turn k's
answer finished, ``gap_s = min(max_gap_s, time_scale * (t[k+1] - t[k]))`` (the trace's gap
between arrivals, which also holds the original model's own answer time); session i starts at
``i * stagger_s``.  Every turn generates ``max_output`` tokens (steady decode for the
inter-token latency; the next prompt holds the trace's answer tokens, not the model's, as with
random weights they are noise anyway).  Sessions run concurrently, one thread each; a request that fails is
recorded with its error and ends nothing but itself.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.live import Streamed, stream_completion, synthesize_tokens
from bench.sim.workloads.kvtester import parse_conversation
from bench.sim.workloads.stream import Request
from bench.sim.workloads.synthetic import AgentWorkload, generate
from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Turn:
    request: Request  # already scaled
    gap_s: float  # wait after the previous turn's answer (0 for the first turn)


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    start_s: float  # first send, seconds after the replay started
    turns: tuple[Turn, ...]


# --- workloads -> requests ----------------------------------------------------------------------

def synthetic_requests(*, sessions: int, turns: int, max_context: int, output_tokens: float = 32,
                       seed: int = 0) -> list[Request]:
    """The synthetic agent loop sized for ``max_context``: a shared prompt of a quarter of it, a
    task of 1/8, tool results that grow the context by about half of it over ``turns`` turns,
    compaction at ``max_context``; no sub-agents."""
    w = AgentWorkload(sessions=sessions, turns=turns, system_tokens=max_context // 4,
                      task_tokens=max_context / 8, tool_result_tokens=max_context / (2 * turns),
                      output_tokens=output_tokens, size_sigma=0.5, context_cap=max_context, subagent_prob=0.0,
                      seed=seed)
    return generate(w)


def kvtester_requests(paths: Sequence[Path], *, sessions: int) -> list[Request]:
    """``sessions`` conversations from the trace files (repeated with fresh scopes as needed)."""
    if not paths:
        raise ConfigError("no kv-cache-tester trace files given")
    docs: list[dict[str, Any]] = []
    for path in sorted(paths):
        try:
            docs.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read as a kv-cache-tester trace ({exc})") from exc
    out: list[Request] = []
    for i in range(sessions):
        doc = docs[i % len(docs)]
        name = f"{doc.get('id', f'trace{i % len(docs)}')}#{i // len(docs)}"
        out += [r for r in parse_conversation(doc, name=name) if r.session == name]  # no sub-agents
    return out


# --- scaling and timing ---------------------------------------------------------------------------

def scale_session(requests: Sequence[Request], *, max_context: int) -> list[Request]:
    """One session's requests shrunk by one factor so that the largest fits ``max_context``."""
    if not requests:
        return []
    largest = max(r.input_tokens for r in requests)
    if largest <= max_context:
        return list(requests)
    per_block = requests[0].block_tokens * max_context / largest  # tokens a block may keep
    small = max(1, int(per_block))  # tokens per scaled block
    stride = math.ceil(1 / per_block) if per_block < 1 else 1  # blocks merged into one
    out = []
    for r in requests:
        ids = r.hash_ids
        if stride > 1:  # the last id of every group (and of a partial last group)
            ids = ids[stride - 1::stride] + ((ids[-1],) if len(ids) % stride else ())
        n = min(max_context, len(ids) * small, math.ceil(r.input_tokens * small / (r.block_tokens * stride)))
        out.append(replace(r, block_tokens=small, input_tokens=n, hash_ids=ids[:math.ceil(n / small)]))
    return out


def to_sessions(requests: Sequence[Request], *, turns: int, max_context: int, time_scale: float = 1.0,
                max_gap_s: float = 2.0, stagger_s: float = 1.0) -> list[Session]:
    """Group by session (in order of first arrival), keep ``turns`` turns, scale, set the timing."""
    if turns <= 0 or max_context <= 0 or time_scale < 0 or max_gap_s < 0 or stagger_s < 0:
        raise ConfigError("turns and max_context must be positive; time_scale, max_gap_s, stagger_s >= 0")
    by_name: dict[str, list[Request]] = {}
    for r in sorted(requests, key=lambda r: r.time_s):
        by_name.setdefault(r.session, []).append(r)
    out = []
    for i, (name, reqs) in enumerate(by_name.items()):
        reqs = scale_session(reqs[:turns], max_context=max_context)
        gaps = [0.0] + [min(max_gap_s, time_scale * (b.time_s - a.time_s)) for a, b in itertools.pairwise(reqs)]
        out.append(Session(name, i * stagger_s, tuple(Turn(r, g) for r, g in zip(reqs, gaps, strict=True))))
    return out


# --- closed-loop replay ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TurnResult:
    session: str
    turn: int
    input_tokens: int
    sent_s: float  # seconds after the replay started
    token_times_s: tuple[float, ...]  # arrival of each streamed token, same clock; () on error
    error: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.sent_s if self.token_times_s else math.nan


Send = Callable[[str, dict[str, Any], float], Streamed]


def agent_hints(session: Session, turn: Turn) -> dict[str, Any]:
    """The ``kv_transfer_params`` an agent framework sends with a turn (``docs/vllm.md``, "Retention
    per request"): its session id, and what the answer will wait for when the trace says so
    (kv-cache-tester's stop reason: ``tool_use`` -> "tool", ``end_turn`` -> "user").  A framework
    knows it when its model's answer is a tool call; with random weights the answer is noise, so the
    trace's stop reason stands in for the tool-call detection (``tool_call_tokens``) a real model gets."""
    spec: dict[str, Any] = {"session": session.name}
    if turn.request.awaits is not None:
        spec["awaits"] = turn.request.awaits
    return {"kvtier": spec}


def replay_sessions(sessions: Sequence[Session], endpoint: str, *, model: str, max_output: int = 8,
                    vocab: int = 32_000, timeout_s: float = 600.0, hints: bool = False,
                    send: Send = stream_completion) -> tuple[list[TurnResult], float]:
    """Run every session in its own thread; returns the results (by send time) and the wall time.
    ``hints``: every turn carries ``agent_hints`` in its ``kv_transfer_params`` (for kvtier)."""
    url = f"{endpoint.rstrip('/')}/v1/completions"
    prompts = [[synthesize_tokens(t.request, vocab=vocab) for t in s.turns] for s in sessions]  # before t0
    results: list[TurnResult] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def run(s: Session, session_prompts: list[list[int]]) -> None:
        time.sleep(max(0.0, t0 + s.start_s - time.perf_counter()))
        for k, (turn, prompt) in enumerate(zip(s.turns, session_prompts, strict=True)):
            if k:
                time.sleep(turn.gap_s)
            body = {"model": model, "prompt": prompt, "max_tokens": max_output, "stream": True,
                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
            if hints:
                body["kv_transfer_params"] = agent_hints(s, turn)
            sent = time.perf_counter()
            try:
                got = send(url, body, timeout_s)
                r = TurnResult(s.name, k, len(prompt), got.sent - t0, tuple(x - t0 for x in got.token_times))
            except (OSError, ValueError, RuntimeError) as exc:
                r = TurnResult(s.name, k, len(prompt), sent - t0, (), f"{type(exc).__name__}: {exc}")
            with lock:
                results.append(r)

    threads = [threading.Thread(target=run, args=(s, p), name=f"kvtier-session-{i}", daemon=True)
               for i, (s, p) in enumerate(zip(sessions, prompts, strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sorted(results, key=lambda r: r.sent_s), wall


# --- summary ----------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    a = np.asarray(values, dtype=float)
    return float(np.percentile(a, q)) if a.size else math.nan


def inter_token_gaps(results: Sequence[TurnResult]) -> tuple[list[float], list[float]]:
    """Gaps between consecutive tokens of running requests: (all, those while another request
    was waiting for its first token, i.e. queued, loading KV or in prefill, at any time in the gap)."""
    ok = [r for r in results if r.token_times_s]
    starts = np.array([r.sent_s for r in ok])
    firsts = np.array([r.token_times_s[0] for r in ok])
    every: list[float] = []
    during: list[float] = []
    for r in ok:
        for a, b in itertools.pairwise(r.token_times_s):  # r's own wait ended before a: never counted
            every.append(b - a)
            if ((starts < b) & (firsts > a)).any():
                during.append(b - a)
    return every, during


def summarize(results: Sequence[TurnResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok]
    every, during = inter_token_gaps(ok)
    span = (max(r.token_times_s[-1] for r in ok) - min(r.sent_s for r in ok)) if ok else math.nan
    return {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
        "requests_per_s": len(ok) / span if ok and span > 0 else math.nan,
        "prompt_tokens": sum(r.input_tokens for r in ok),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "itl_p50_s": percentile(every, 50), "itl_p90_s": percentile(every, 90),
        "itl_during_loads_p50_s": percentile(during, 50), "itl_during_loads_p90_s": percentile(during, 90),
        "itl_during_loads_max_s": max(during) if during else math.nan,
        "itl_samples": len(every), "itl_during_loads_samples": len(during),
        "first_errors": [r.error for r in results if r.error][:3],
    }
