"""The prefix-aware offline bound: no online policy beats it, it never exceeds the ideal."""

from __future__ import annotations

import random

import pytest

from bench.sim.costmodel import CostModel, model_shape
from bench.sim.sim import TierSpec, belady, ideal, prefix_bound, prepare, simulate
from bench.sim.workloads.stream import Request
from kvtier.policy.registry import POLICIES

COST = CostModel(shape=model_shape("llama-3.1-8b"))
BLOCK = 16


def random_workload(seed: int) -> list[Request]:
    """Sessions that grow, fork (sub-agents from a parent's prefix), compact and end, over a
    shared system prompt; small enough that capacities of a few chunks are tight."""
    rng = random.Random(seed)
    system = list(range(rng.randint(0, 4)))
    contexts: dict[str, list[int]] = {}
    fresh = iter(range(1000, 10**9))
    out, t = [], 0.0
    for n in range(rng.randint(5, 40)):
        t += rng.choice((0.5, 1.0, 2.0, 30.0))
        live = sorted(contexts)
        roll = rng.random()
        if not live or roll < 0.2:  # a new session
            name = f"s{n}"
            contexts[name] = system + [next(fresh) for _ in range(rng.randint(1, 6))]
        elif roll < 0.3:  # a sub-agent forks a parent's prefix
            parent = contexts[rng.choice(live)]
            name = f"s{n}"
            contexts[name] = parent[:rng.randint(1, len(parent))] + [next(fresh) for _ in range(rng.randint(0, 3))]
        else:
            name = rng.choice(live)
            ctx = contexts[name]
            if rng.random() < 0.1:  # compaction: keep the system prompt, summarise the rest
                contexts[name] = system + [next(fresh) for _ in range(rng.randint(1, 3))]
            else:
                ctx += [next(fresh) for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.1:
                del contexts[name]  # the session ends after this call
                contexts[f"gone{n}"] = []
        ids = contexts.get(name) or [next(fresh)]
        out.append(Request(time_s=t, session=name, scope="s", hash_ids=tuple(ids), block_tokens=BLOCK,
                           input_tokens=len(ids) * BLOCK + rng.randint(0, BLOCK - 1), output_tokens=1))
        contexts = {k: v for k, v in contexts.items() if v}
    return out


def hits(run) -> int:
    return int(run.hit_total.sum())


@pytest.mark.parametrize("seed", range(60))
def test_no_online_policy_beats_the_bound(seed: int) -> None:
    work = prepare(random_workload(seed))
    chunk = COST.shape.layout.bytes_per_token * work.chunk_tokens
    rng = random.Random(seed)
    best = hits(ideal(work, COST))
    for policy in sorted(POLICIES):
        g2 = rng.randint(1, 6)
        g3 = rng.choice((0, 0, 2, 5))
        specs = [TierSpec(name="dram", capacity_bytes=g2 * chunk)]
        if g3:
            specs.append(TierSpec(name="disk", capacity_bytes=g3 * chunk, persistent=True))
        bound = hits(prefix_bound(work, COST, (g2 + g3) * chunk))
        assert bound <= best
        assert bound >= hits(belady(work, COST, (g2 + g3) * chunk))
        for exclusive in (False, True):
            run = simulate(work, COST, specs, policy=policy, exclusive=exclusive)
            assert hits(run) <= bound, (policy, g2, g3, exclusive)


def test_bound_reaches_the_ideal_with_room_and_nothing_without() -> None:
    work = prepare(random_workload(7))
    chunk = COST.shape.layout.bytes_per_token * work.chunk_tokens
    assert hits(prefix_bound(work, COST, work.unique_chunks * chunk)) == hits(ideal(work, COST)) > 0
    assert hits(prefix_bound(work, COST, 0)) == 0


def test_bound_on_the_shared_conversations(shared_traces) -> None:
    # the case: lru-prefix got more prefix hits than MIN; none gets more than the bound
    from bench.sim.workloads.kvtester import load_kvtester_dir

    work = prepare(load_kvtester_dir(sorted((shared_traces / "kv-cache-tester").glob("*.json"))))
    capacity = work.unique_chunks * COST.shape.layout.bytes_per_token * work.chunk_tokens // 4
    bound = hits(prefix_bound(work, COST, capacity))
    assert hits(belady(work, COST, capacity)) <= bound <= hits(ideal(work, COST))
    for policy in ("lru-prefix", "agent"):
        assert hits(simulate(work, COST, [TierSpec(name="dram", capacity_bytes=capacity)], policy=policy)) <= bound
