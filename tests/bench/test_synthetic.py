"""Synthetic agent workload generator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.sim.workloads.synthetic import AgentWorkload, generate
from kvtier.errors import ConfigError


def test_seeded_and_reproducible() -> None:
    w = AgentWorkload(sessions=4, turns=10, seed=7)
    assert generate(w) == generate(w)
    assert generate(w) != generate(AgentWorkload(sessions=4, turns=10, seed=8))
    # adding a session leaves the others' calls unchanged
    more = generate(AgentWorkload(sessions=5, turns=10, seed=7))
    assert [r for r in more if r.session != "agent-4" and "/" not in r.session] == \
        [r for r in generate(w) if "/" not in r.session]


def test_shared_system_prompt_and_growing_contexts() -> None:
    w = AgentWorkload(sessions=3, turns=6, system_tokens=6400, subagent_prob=0.0)
    reqs = generate(w)
    assert len(reqs) == 18 and reqs == sorted(reqs, key=lambda r: r.time_s)
    heads = {r.hash_ids[:100] for r in reqs}
    assert len(heads) == 1  # 6400 tokens = 100 blocks shared by every call of every session
    for s in range(3):
        calls = [r for r in reqs if r.session == f"agent-{s}"]
        for a, b in itertools.pairwise(calls):
            assert b.input_tokens > a.input_tokens
            full = a.num_full_blocks
            assert b.hash_ids[:full] == a.hash_ids[:full]  # a turn extends the previous context
    assert {r.hash_ids[100] for r in reqs if r.input_tokens > 6464} .__len__() == 3  # sessions differ after it


def test_subagents_fork_from_parent_context() -> None:
    w = AgentWorkload(sessions=2, turns=20, subagent_prob=0.5, seed=3)
    reqs = generate(w)
    subs = [r for r in reqs if "/" in r.session]
    assert subs
    for sub in subs:
        parent = sub.session.split("/")[0]
        before = [r for r in reqs if r.session == parent and r.time_s <= sub.time_s]
        fork = before[-1]
        assert sub.hash_ids[:fork.num_full_blocks] == fork.hash_ids[:fork.num_full_blocks]


def test_context_cap_and_gap_mean() -> None:
    w = AgentWorkload(sessions=40, turns=60, context_cap=40_000, subagent_prob=0.0, seed=1)
    reqs = generate(w)
    assert max(r.input_tokens for r in reqs) <= 40_000
    gaps = []
    for s in range(40):
        t = [r.time_s for r in reqs if r.session == f"agent-{s}"]
        gaps += np.diff(t).tolist()
    assert 3.0 < float(np.mean(gaps)) < 5.0  # 3.9 s by construction; heavy tail => loose bound
    assert float(np.percentile(gaps, 99)) > 5 * float(np.median(gaps))  # the human think-time tail


def test_invalid_config() -> None:
    with pytest.raises(ConfigError):
        AgentWorkload(gap_mean_s=1.0, human_prob=0.1, human_mean_s=30.0)
    with pytest.raises(ConfigError):
        AgentWorkload(sessions=0)


def test_each_call_says_what_its_answer_waits_for() -> None:
    w = AgentWorkload(sessions=20, turns=40, subagent_prob=0.2, seed=2)
    reqs = generate(w)
    assert {r.awaits for r in reqs} == {"tool", "user"}
    sessions = {r.session for r in reqs}
    for name in sessions:  # a session's last answer waits for nobody's tool: "user"
        assert [r for r in reqs if r.session == name][-1].awaits == "user"
    top = [r for r in reqs if "/" not in r.session]
    for name in {r.session for r in top}:
        calls = [r for r in top if r.session == name]
        for a, b in itertools.pairwise(calls):
            forked = any(s.session.startswith(f"{name}/") and a.time_s < s.time_s < b.time_s for s in reqs)
            if forked:
                assert a.awaits == "tool"  # it waits for its sub-agents
            elif b.time_s - a.time_s > 30.0:  # no tool round-trip (exponential, mean 2.5 s) takes 30 s
                assert a.awaits == "user"
    # the human share of the gaps (5%, less the gaps after a fork), give or take: the rest are tools
    ends = [r.awaits for r in top]
    assert 0.01 < (ends.count("user") - len({r.session for r in top})) / len(ends) < 0.10
