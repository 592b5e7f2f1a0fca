"""The agent-aware policy: predicted next use, deepest first, admission, dead tails, shared model."""

from __future__ import annotations

import random

import pytest

from kvtier.keys import ChunkKey
from kvtier.policy.agent import AgentModel, AgentPolicy
from kvtier.policy.eviction import LRUPolicy
from kvtier.policy.index import TierIndex
from kvtier.policy.registry import make_policies


def keys(prefix: str, n: int) -> list[ChunkKey]:
    return [ChunkKey(f"{prefix}{i}".encode().ljust(16, b".")) for i in range(n)]


def request(index: TierIndex, ks: list[ChunkKey], *, session: str, now: float) -> int:
    """What the hierarchy does for one request: hint, read the cached prefix, store the rest."""
    index.policy.observe(ks, session=session, now=now)
    hit = 0
    while hit < len(ks) and ks[hit] in index:
        index.touch(ks[hit])
        hit += 1
    for key in ks[hit:]:
        victims = index.plan_room(1, lambda _: True, admit=key)
        if victims is None:
            break  # refused: so are its descendants (the hierarchy sends them below)
        index.add(key, 1)
    return hit


def test_a_context_larger_than_the_tier_keeps_its_head() -> None:
    # LRU scans a 10-chunk context through 4 slots and keeps its tail: no hit next time
    ctx = keys("a", 10)
    hits = {}
    for name, policy in (("agent", AgentPolicy()), ("lru", LRUPolicy())):
        index = TierIndex("g2", 4, policy)
        hits[name] = [request(index, ctx, session="a", now=t) for t in (0.0, 5.0, 10.0)]
    assert hits == {"agent": [0, 4, 4], "lru": [0, 0, 0]}


def test_the_session_due_first_keeps_its_chunks() -> None:
    # a fast tool loop (every 2 s) and a slow human (every 60 s) share 6 slots
    index = TierIndex("g2", 6, AgentPolicy())
    fast, slow = keys("f", 4), keys("s", 4)
    t = 0.0
    for turn in range(6):
        request(index, fast, session="fast", now=t)
        if turn % 3 == 0:
            request(index, slow, session="slow", now=t + 1)
        t += 2.0
    assert all(key in index for key in fast)  # the fast loop's context is whole
    assert sum(key in index for key in slow) == 2  # the slow one keeps its head in the rest
    assert slow[0] in index and slow[1] in index


def test_a_compacted_tail_goes_first() -> None:
    index = TierIndex("g2", 10, AgentPolicy())  # room for everything: only the order is tested
    old = keys("x", 6)
    request(index, old, session="s", now=0.0)
    request(index, old, session="s", now=1.0)
    shared = keys("y", 2)
    request(index, shared, session="other", now=1.5)
    compacted = old[:2] + keys("z", 2)  # the session summarised: it keeps 2 chunks, then new ones
    request(index, compacted, session="s", now=2.0)
    victims = [index.policy.pop_victim(lambda _: True) for _ in range(4)]
    assert set(victims) == set(old[2:])  # the dead tail, before anything alive


def test_shared_prefix_is_due_with_its_first_caller() -> None:
    model = AgentModel()
    policy = AgentPolicy(model)
    system = keys("sys", 2)
    for t in range(0, 100, 10):  # session a every 10 s
        model.observe(system, session="a", now=float(t))
        for key in system:
            policy.insert(key, 1) if key not in policy.held else policy.access(key)
    model.observe(system, session="b", now=95.0)  # b calls once: no rhythm of its own
    policy.access(system[0])
    assert model.nodes[system[0]].due <= 90.0 + 10.0 + 1e-9  # still a's next call


def test_pinned_chunks_are_skipped_and_put_back() -> None:
    policy = AgentPolicy()
    ks = keys("p", 3)
    policy.observe(ks, session="s", now=0.0)
    for key in ks:
        policy.insert(key, 1)
    assert policy.pop_victim(lambda key: key != ks[2]) == ks[1]  # deepest evictable first
    assert policy.pop_victim(lambda _: False) is None
    assert policy.pop_victim(lambda _: True) == ks[2] and len(policy) == 1


def test_one_model_for_every_tier_and_unhinted_use() -> None:
    g2, g3 = make_policies("agent", 2)
    assert isinstance(g2, AgentPolicy) and isinstance(g3, AgentPolicy) and g2.model is g3.model
    assert len({id(p) for p in make_policies("lru", 2)}) == 2
    clock = iter(float(t) for t in range(1000))
    policy = AgentPolicy(AgentModel(clock=lambda: next(clock)))  # no hints: its own clock
    ks = keys("u", 3)
    for key in ks:
        policy.insert(key, 1)
    policy.access(ks[0])
    assert policy.pop_victim(lambda _: True) in ks[1:] and len(policy) == 2


def test_heaps_stay_consistent_under_random_operations() -> None:
    rng = random.Random(3)
    policy = AgentPolicy()
    pool, held = keys("r", 40), set()
    for step in range(3000):
        key = rng.choice(pool)
        op = rng.random()
        if step % 7 == 0:
            policy.observe(rng.sample(pool, 5), session=rng.choice("abc"), now=step / 10)
        if op < 0.4:
            policy.insert(key, 1)
            held.add(key)
        elif op < 0.7:
            policy.access(key)
        elif op < 0.8:
            policy.remove(key)
            held.discard(key)
        else:
            victim = policy.pop_victim(lambda k: k != pool[0])
            assert (victim is None) == (held <= {pool[0]})
            assert victim != pool[0]
            held.discard(victim)  # type: ignore[arg-type]
        assert policy.held == held and len(policy) == len(held)
        assert all(n.tiers == 1 for k, n in policy.model.nodes.items() if k in held)


def test_an_answer_that_waits_for_the_user_goes_before_one_that_calls_a_tool() -> None:
    # two sessions of the same rhythm: after a tool call each is back in 2 s, after the user's turn
    # in 60 s; told how their last answers ended, the policy evicts the one waiting for a human
    index = TierIndex("g2", 8, AgentPolicy())
    a, b = keys("a", 4), keys("b", 4)
    for t, end in ((0.0, "tool"), (2.0, "user"), (62.0, "tool"), (64.0, None)):
        for session, ks, offset in (("a", a, 0.0), ("b", b, 0.5)):
            request(index, ks, session=session, now=t + offset)
            if end is not None:
                index.policy.observe_end(session, awaits=end)
    model = index.policy.model
    assert model.sessions["a"].class_gap == {"tool": 2.0, "user": 60.0}
    index.policy.observe_end("a", awaits="user")
    index.policy.observe_end("b", awaits="tool")
    # due after the gap, counted from when the end was told (the model's time: b's call at 64.5)
    assert model.nodes[a[0]].due == 64.5 + 60.0 and model.nodes[b[0]].due == 64.5 + 2.0
    victims = [index.policy.pop_victim(lambda _: True) for _ in range(4)]
    assert set(victims) == set(a)


def test_an_end_keeps_a_shared_chunk_due_with_a_sooner_caller() -> None:
    model = AgentModel()
    policy = AgentPolicy(model)
    system, own = keys("sys", 1), keys("own", 1)
    calls = [(float(t), "f", system) for t in range(0, 106, 3)]  # session f: a tool loop, every 3 s
    calls += [(7.0, "h", system + own), (107.0, "h", system + own)]  # session h: a human, 100 s apart
    for t, session, ks in sorted(calls, key=lambda c: c[0]):
        model.observe(ks, session=session, now=t)
        for key in ks:
            policy.insert(key, 1) if key not in policy.held else policy.access(key)
        if session == "h":
            model.observe_end("h", "user")
    assert model.nodes[own[0]].due == 207.0  # h's own chunk: its next call, 100 s on
    assert model.nodes[system[0]].due < 110.0  # the shared one: f's next call comes first
    with pytest.raises(ValueError, match="awaits must be one of"):
        model.observe_end("h", "later")


def test_a_new_session_is_due_after_the_gap_new_sessions_took() -> None:
    # before any session came back, a new one is not expected back; once sessions came back 3 s after
    # their first call, a new session's first context is due 3 s later (and so admitted over an idle one)
    model = AgentModel()
    model.observe(keys("a", 1), session="a", now=0.0)
    assert model.predict(keys("a", 1)[0])[0] == 1e9
    model.observe(keys("a", 1), session="a", now=3.0)
    assert model.first_gap == 3.0
    model.observe(keys("b", 1), session="b", now=10.0)
    assert model.predict(keys("b", 1)[0])[0] == 13.0


def test_an_answers_end_resets_idle_time_and_times_the_next_call() -> None:
    # the gap after a tool call is learned from the answer's end; the end counts as a sign of life
    model = AgentModel()
    policy = AgentPolicy(model)
    ks = keys("a", 2)
    for t, end_at in ((0.0, 4.0), (10.0, 14.0), (20.0, None)):
        model.observe(ks, session="a", now=t)
        for k in ks:
            policy.insert(k, 1)
        if end_at is not None:
            model.now = end_at  # what the simulator's clock says when the end is told
            model.observe_end("a", "tool")
    assert model.sessions["a"].class_gap == {"tool": pytest.approx(6.0)}  # 10 - 4, then 20 - 14
    model.now = 25.0
    model.observe_end("a", "tool")
    node = model.nodes[ks[0]]
    assert node.alive == 25.0 and node.due == pytest.approx(31.0)


def _batch(index: TierIndex, reqs: list[list[ChunkKey]], *, now: float) -> int:
    """What an engine does: hint a batch of anonymous requests, then store each one's new chunks
    (over the next steps of chunked prefill, after every hint of the batch); returns chunks stored."""
    for ks in reqs:
        index.policy.observe(ks, session=None, now=now)
    stored = 0
    for ks in reqs:
        hit = 0
        while hit < len(ks) and ks[hit] in index:
            index.touch(ks[hit])
            hit += 1
        for key in ks[hit:]:
            if index.plan_room(1, lambda _: True, admit=key) is None:
                break
            index.add(key, 1)
            stored += 1
    return stored


def test_an_engines_batches_of_anonymous_requests_keep_being_cached() -> None:
    """No session ids and chunks stored after the whole batch was hinted (vLLM's scheduler): a
    full tier still admits the growing contexts that come back, and serves their prefixes. (A first
    use predicted "never back", and uses of any request but the latest hinted one ignored, froze
    the tier with its first contents for good: every later chunk was refused.)"""
    index = TierIndex("g2", 8, AgentPolicy())
    contexts = [keys(f"s{s}-", 12) for s in range(4)]
    hits_late = stored_late = 0
    for turn in range(1, 7):
        for pair in ((0, 1), (2, 3)):
            batch = [contexts[s][:turn + 1] for s in pair]
            before = sum(k in index for ks in batch for k in ks)
            stored = _batch(index, batch, now=10.0 * turn + pair[0])
            if turn >= 4:
                hits_late += before
                stored_late += stored
    assert stored_late > 0  # the tier keeps learning
    assert hits_late > 0  # and the sessions that come back hit
