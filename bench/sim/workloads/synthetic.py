"""A synthetic agentic workload: many concurrent agent sessions, seeded and reproducible.

Each session is a coding-agent loop.  Its context starts with a system+tools prompt that every
session shares (same block ids, so the cache can share it), then a user task; every turn appends
the previous model output and a tool result, and the next call arrives a gap later.  Gaps are
short tool round-trips (exponential) mixed with human think time (Pareto, heavy tail), scaled
so that their mean is ``gap_mean_s``.  A context that outgrows ``context_cap`` is compacted:
it restarts from the shared prompt plus a summary (all new blocks).  Now and then a turn forks
sub-agents: each starts from the parent's whole context plus its own task, runs its own turns
concurrently with its siblings, and the parent resumes (with their results appended) after the
last one finishes.

Block ids are ``session << 32 | counter`` (the shared prompt uses session 0), so sessions never
collide and generating one more session never changes the others.  Sizes are lognormal with the
given means; everything comes from ``numpy.random.default_rng([seed, session])``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bench.sim.workloads.stream import Request
from kvtier.errors import ConfigError

SCOPE = "synthetic-agent"


@dataclass(frozen=True, kw_only=True)
class AgentWorkload:
    """Knobs of the generator; defaults give ~90K-token sessions a few seconds apart."""

    sessions: int = 16
    turns: int = 50  # top-level calls per session (sub-agent calls come on top)
    system_tokens: int = 15_000  # system prompt + tool definitions, shared by every session
    task_tokens: float = 2_000  # mean of the first user message
    tool_result_tokens: float = 1_400  # mean tokens a tool result appends per turn
    output_tokens: float = 300  # mean model output per call (appended to the context next turn)
    size_sigma: float = 1.0  # lognormal shape of every size above
    gap_mean_s: float = 3.9  # mean time between a session's calls
    human_prob: float = 0.05  # fraction of gaps that are human think time
    human_mean_s: float = 30.0  # mean human think time (Pareto, alpha 1.5)
    context_cap: int = 865_000  # compact the context when it would pass this
    subagent_prob: float = 0.04  # chance that a turn forks sub-agents
    max_subagents: int = 3  # forks 1..max_subagents sub-agents at once
    subagent_turns: int = 8  # calls per sub-agent
    start_spread_s: float = 60.0  # sessions start uniformly in [0, start_spread_s)
    block_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sessions <= 0 or self.turns <= 0 or self.block_tokens <= 0:
            raise ConfigError("sessions, turns and block_tokens must be positive")
        if not 0 <= self.human_prob < 1 or not 0 <= self.subagent_prob <= 1:
            raise ConfigError("human_prob must be in [0, 1) and subagent_prob in [0, 1]")
        if self.gap_mean_s <= self.human_prob * self.human_mean_s:
            raise ConfigError(f"gap_mean_s {self.gap_mean_s} must exceed human_prob x human_mean_s "
                              f"= {self.human_prob * self.human_mean_s}")
        if self.context_cap <= self.system_tokens + 4 * self.block_tokens:
            raise ConfigError("context_cap must leave room after the system prompt")


class _Context:
    """A growing token sequence as block ids: full blocks + a partial tail (never shared)."""

    def __init__(self, ids: list[int], tail: int, alloc: _Ids) -> None:
        self.ids, self.tail, self._alloc = ids, tail, alloc

    def tokens(self, block: int) -> int:
        return len(self.ids) * block + self.tail

    def append(self, n: int, block: int) -> None:
        total = self.tail + n
        self.ids += [self._alloc.next() for _ in range(total // block)]
        self.tail = total % block

    def fork(self, alloc: _Ids) -> _Context:
        return _Context(list(self.ids), self.tail, alloc)

    def request_ids(self) -> tuple[int, ...]:
        # The partial tail gets a fresh id each time: it is never cached anyway.
        return (*self.ids, self._alloc.next()) if self.tail else tuple(self.ids)


class _Ids:
    def __init__(self, space: int) -> None:
        self.space, self.n = space, 0

    def next(self) -> int:
        self.n += 1
        return (self.space << 32) | self.n


def generate(w: AgentWorkload) -> list[Request]:
    """Every call of every session, sorted by arrival time."""
    shared = _Ids(0)
    system_ids = [shared.next() for _ in range(w.system_tokens // w.block_tokens)]
    system_tail = w.system_tokens % w.block_tokens
    out: list[Request] = []
    for s in range(w.sessions):
        rng = np.random.default_rng([w.seed, s])
        ids = _Ids(s + 1)
        ctx = _Context(list(system_ids), 0, ids)
        ctx.append(system_tail + _size(rng, w.task_tokens, w.size_sigma), w.block_tokens)
        _session(w, rng, ids, ctx, f"agent-{s}", float(rng.uniform(0, w.start_spread_s)), system_ids, out)
    out.sort(key=lambda r: (r.time_s, r.session))
    return out


def _session(w: AgentWorkload, rng: np.random.Generator, ids: _Ids, ctx: _Context, name: str, t: float,
             system_ids: list[int], out: list[Request], turns: int | None = None, depth: int = 0) -> float:
    """Emit one session's calls starting at ``t``; returns when its last call arrived.  Each call's
    ``awaits`` says what its answer waits for: "tool" before a tool round-trip (or its sub-agents),
    "user" before a human's think time and after the session's last call (kv-cache-tester's stop)."""
    last = -1  # index in ``out`` of this session's previous call
    for turn in range(turns if turns is not None else w.turns):
        if turn:
            ctx.append(_size(rng, w.tool_result_tokens, w.size_sigma), w.block_tokens)
            gap, human = _draw_gap(rng, w)
            t += gap
            if out[last].awaits is None:  # a call that forked sub-agents waits for them: "tool" already
                out[last] = replace(out[last], awaits="user" if human else "tool")
        if ctx.tokens(w.block_tokens) > w.context_cap:  # compaction: shared prompt + a summary
            ctx = _Context(list(system_ids), 0, ids)
            room = (w.context_cap - w.system_tokens) // 4
            ctx.append(min(room, _size(rng, w.task_tokens * 2, w.size_sigma)), w.block_tokens)
        n_out = _size(rng, w.output_tokens, w.size_sigma)
        out.append(Request(time_s=t, session=name, scope=SCOPE, hash_ids=ctx.request_ids(),
                           block_tokens=w.block_tokens, input_tokens=ctx.tokens(w.block_tokens),
                           output_tokens=n_out))
        last = len(out) - 1
        ctx.append(n_out, w.block_tokens)
        if depth == 0 and rng.random() < w.subagent_prob:
            out[last] = replace(out[last], awaits="tool")
            end = t
            for k in range(int(rng.integers(1, w.max_subagents + 1))):
                child = ctx.fork(ids)
                child.append(_size(rng, w.task_tokens / 2, w.size_sigma), w.block_tokens)
                end = max(end, _session(w, rng, ids, child, f"{name}/sa{turn}.{k}", t + _gap(rng, w),
                                        system_ids, out, turns=w.subagent_turns, depth=depth + 1))
            ctx.append(_size(rng, w.output_tokens, w.size_sigma), w.block_tokens)  # their results
            t = end
    if last >= 0:
        out[last] = replace(out[last], awaits="user")  # the session's last answer: nothing calls back
    return t


def _size(rng: np.random.Generator, mean: float, sigma: float) -> int:
    """A lognormal integer with the given mean (at least 1)."""
    mu = np.log(max(mean, 1.0)) - sigma * sigma / 2
    return max(1, int(rng.lognormal(mu, sigma)))


def _gap(rng: np.random.Generator, w: AgentWorkload) -> float:
    return _draw_gap(rng, w)[0]


def _draw_gap(rng: np.random.Generator, w: AgentWorkload) -> tuple[float, bool]:
    """(seconds, whether it is a human's think time rather than a tool round-trip)."""
    if rng.random() < w.human_prob:
        alpha = 1.5
        xm = w.human_mean_s * (alpha - 1) / alpha
        return float(xm * (1 + rng.pareto(alpha))), True
    tool_mean = (w.gap_mean_s - w.human_prob * w.human_mean_s) / (1 - w.human_prob)
    return float(rng.exponential(tool_mean)), False
