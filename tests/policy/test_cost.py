"""Fetch-or-recompute decisions from figures alone (no payloads, no torch)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.policy.cost import CostModel, LinkCost, PrefillCost

C, CB = 256, 32 << 20  # Llama-3.1-8B chunk: 256 tokens, 32 MiB
PREFILL = PrefillCost(fixed_s=0.01, per_token_s=25e-6, per_token_ctx_s=1e-9)  # ~1.4 s for 32K


def model(*links: LinkCost, stages: int = 1) -> CostModel:
    return CostModel(links=links, prefill=PREFILL, stages=stages)


def test_link_and_prefill_arithmetic() -> None:
    link = LinkCost(bandwidth_Bps=50e9, latency_s=1e-4)
    assert link.seconds(0) == 0.0
    assert link.seconds(50_000_000_000) == pytest.approx(1.0001)
    assert PREFILL.seconds(100, 0) == 0.0
    assert PREFILL.seconds(0, 1000) == pytest.approx(0.01 + 1000 * 25e-6 + 1000 * 500 * 1e-9)
    assert PREFILL.seconds(4000, 1000) > PREFILL.seconds(0, 1000)  # attention over the cached part
    with pytest.raises(ValueError):
        LinkCost(bandwidth_Bps=0)
    with pytest.raises(ValueError):
        LinkCost(bandwidth_Bps=1, latency_s=-1)
    with pytest.raises(ValueError):
        CostModel(links=(), prefill=PREFILL)


def test_fit_recovers_coefficients() -> None:
    points = [(0, 512), (0, 2048), (0, 8192), (4096, 256), (16384, 1024)]
    samples = [(p, n, PREFILL.seconds(p, n)) for p, n in points]
    fit = PrefillCost.fit(samples)
    assert fit.per_token_s == pytest.approx(PREFILL.per_token_s, rel=1e-6)
    assert fit.per_token_ctx_s == pytest.approx(PREFILL.per_token_ctx_s, rel=1e-6)
    assert fit.fixed_s == pytest.approx(PREFILL.fixed_s, rel=1e-6)
    with pytest.raises(ValueError):
        PrefillCost.fit(samples[:2])
    with pytest.raises(ValueError):
        PrefillCost.fit([(0, 1, 0.0), (0, 2, 0.0), (0, 3, 0.0)])


def test_fast_link_loads_everything_usable() -> None:
    plan = model(LinkCost(bandwidth_Bps=50e9)).plan([0] * 128, total_tokens=128 * C + 256,
                                                     tokens_per_chunk=C, chunk_bytes=CB)
    assert plan.load_chunks == 128 and plan.cached_chunks == 128
    assert plan.est_total_s < plan.est_recompute_s / 10 and plan.speedup > 10


def test_slow_link_recomputes() -> None:
    plan = model(LinkCost(bandwidth_Bps=0.5e9)).plan([0] * 16, total_tokens=16 * C + 256,
                                                     tokens_per_chunk=C, chunk_bytes=CB)
    assert plan.load_chunks == 0
    assert plan.est_total_s == pytest.approx(plan.est_recompute_s)


def test_loads_the_fast_head_and_recomputes_the_slow_tail() -> None:
    fast, slow = LinkCost(bandwidth_Bps=50e9), LinkCost(bandwidth_Bps=0.2e9, latency_s=0.05)
    plan = model(fast, slow).plan([0] * 8 + [1] * 8, total_tokens=16 * C + 10, tokens_per_chunk=C,
                                  chunk_bytes=CB)
    assert plan.load_chunks == 8


def test_never_loads_the_whole_prompt() -> None:
    link = LinkCost(bandwidth_Bps=1e15)
    assert model(link).plan([0] * 4, total_tokens=4 * C, tokens_per_chunk=C, chunk_bytes=CB).load_chunks == 3
    assert model(link).plan([0] * 4, total_tokens=4 * C + 1, tokens_per_chunk=C, chunk_bytes=CB).load_chunks == 4
    assert model(link).plan([0] * 4, total_tokens=C, tokens_per_chunk=C, chunk_bytes=CB).cached_chunks == 0
    assert model(link).plan([], total_tokens=1, tokens_per_chunk=C, chunk_bytes=CB).load_chunks == 0


def test_latency_is_paid_once_per_run_of_one_tier() -> None:
    link = LinkCost(bandwidth_Bps=1e12, latency_s=0.5)
    plan = model(link, link).plan([0, 0, 1, 1, 0], total_tokens=5 * C + 1, tokens_per_chunk=C, chunk_bytes=CB)
    assert plan.load_chunks in (0, 5)
    if plan.load_chunks == 5:
        assert plan.est_load_s == pytest.approx(3 * 0.5 + 5 * CB / 1e12)


def test_pipelining_overlaps_load_and_compute() -> None:
    link = LinkCost(bandwidth_Bps=50e9)
    serial = model(link).plan([0] * 64, total_tokens=64 * C + 256, tokens_per_chunk=C, chunk_bytes=CB)
    piped = model(link, stages=32).plan([0] * 64, total_tokens=64 * C + 256, tokens_per_chunk=C, chunk_bytes=CB)
    assert serial.est_total_s == pytest.approx(serial.est_load_s + serial.est_compute_s)
    big, small = max(piped.est_load_s, piped.est_compute_s), min(piped.est_load_s, piped.est_compute_s)
    assert piped.est_total_s == pytest.approx(big + small / 32)
    assert piped.est_total_s < serial.est_total_s


def test_unknown_tier_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="tier level 1"):
        model(LinkCost(bandwidth_Bps=1e9)).plan([0, 1], total_tokens=3 * C, tokens_per_chunk=C, chunk_bytes=CB)


def test_decision_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvtier.policy.cost"):
        model(LinkCost(bandwidth_Bps=50e9), LinkCost(bandwidth_Bps=1e9)).plan(
            [0, 0, 1], total_tokens=3 * C + 5, tokens_per_chunk=C, chunk_bytes=CB)
    assert "fetch-or-recompute" in caplog.text and "levels 0x2,1x1" in caplog.text


def test_json_round_trip(tmp_path: Path) -> None:
    cost = model(LinkCost(bandwidth_Bps=50e9, latency_s=1e-5), LinkCost(bandwidth_Bps=3e9), stages=32)
    path = tmp_path / "cost.json"
    cost.save(path)
    assert CostModel.load(path) == cost
    with pytest.raises(ValueError, match="not a cost model"):
        CostModel.from_json('{"links": []}')


@given(levels=st.lists(st.integers(0, 2), max_size=40), extra=st.integers(0, 600),
       bws=st.tuples(*(st.floats(1e7, 1e12) for _ in range(3))), stages=st.integers(1, 64))
def test_plan_is_the_cheapest_prefix(levels: list[int], extra: int, bws: tuple[float, float, float],
                                     stages: int) -> None:
    """Brute force: no other split of the hit is estimated cheaper than the plan's."""
    cost = CostModel(links=tuple(LinkCost(bandwidth_Bps=b, latency_s=1e-3) for b in bws), prefill=PREFILL,
                     stages=stages)
    total = len(levels) * C + extra
    plan = cost.plan(levels, total_tokens=total, tokens_per_chunk=C, chunk_bytes=CB)
    assert 0 <= plan.load_chunks <= plan.cached_chunks <= len(levels)
    for k in range(plan.cached_chunks + 1):
        runs = sum(1 for i in range(k) if i == 0 or levels[i] != levels[i - 1])
        load = sum(CB / bws[levels[i]] for i in range(k)) + runs * 1e-3
        compute = PREFILL.seconds(k * C, total - k * C)
        other = load + compute if stages == 1 else max(load, compute) + min(load, compute) / stages
        assert plan.est_total_s <= other * (1 + 1e-9)


# --- compute + load split -------------------------------------------------------------------------
DISK = LinkCost(bandwidth_Bps=1.6e9, latency_s=1e-3)  # a G3 read of 32 MiB chunks: ~21 ms each


def _split_total(cost: CostModel, levels: list[int], total: int, c: int, k: int) -> float:
    """The split's estimate by hand: max(head compute, load of [c, k)) + suffix."""
    runs = sum(1 for i in range(c, k) if i == c or levels[i] != levels[i - 1])
    load = sum(CB / cost.links[levels[i]].bandwidth_Bps for i in range(c, k)) + runs * cost.links[0].latency_s
    return max(PREFILL.seconds(0, c * C), load) + PREFILL.seconds(k * C, total - k * C)


def test_split_computes_the_head_while_the_tail_loads() -> None:
    n, total = 128, 128 * C + 256  # 32K cached: recompute ~1.4 s, load ~2.7 s
    cost = model(DISK)
    plain = cost.plan([0] * n, total_tokens=total, tokens_per_chunk=C, chunk_bytes=CB)
    plan = cost.plan([0] * n, total_tokens=total, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    assert plain.load_chunks == 0 and not plain.is_split  # without a split, recomputing wins
    assert plan.is_split and 0 < plan.compute_chunks < plan.load_chunks == n
    assert plan.loaded_chunks == n - plan.compute_chunks
    head = PREFILL.seconds(0, plan.compute_chunks * C)
    assert plan.est_total_s == pytest.approx(_split_total(cost, [0] * n, total, plan.compute_chunks, n))
    # both sides finish together: one chunk more or less on either side would not balance better
    per_chunk = max(CB / DISK.bandwidth_Bps, PREFILL.seconds(0, (plan.compute_chunks + 1) * C) - head)
    assert abs(head - plan.est_load_s) <= per_chunk
    # and the split beats both pure decisions by the overlap
    pure_load = CB * n / DISK.bandwidth_Bps + DISK.latency_s + PREFILL.seconds(n * C, 256)
    assert plan.est_total_s < min(plain.est_recompute_s, pure_load) / 1.3


def test_split_is_not_chosen_when_a_pure_decision_is_as_good() -> None:
    fast = model(LinkCost(bandwidth_Bps=50e9), stages=32)  # layer-wise: the load hides the compute
    plan = fast.plan([0] * 64, total_tokens=64 * C + 5, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    assert plan.load_chunks > 0 and plan.compute_chunks == 0  # DRAM: a pure load (c = 0)
    glacial = model(LinkCost(bandwidth_Bps=1e6))
    plan = glacial.plan([0] * 64, total_tokens=64 * C + 5, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    assert plan.load_chunks == 0 and plan.compute_chunks == 0  # a link this slow: recompute all (c = n)
    one = model(DISK).plan([0], total_tokens=C + 5, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    assert not one.is_split  # one chunk cannot be split


def test_the_split_search_is_linear_in_the_hit() -> None:
    """One pointer walks the meeting point for every end (no bisection per end), and ends that
    cannot win by the margin are skipped: head evaluations stay a few per chunk."""
    calls = {"head": 0}

    class Counting(PrefillCost):
        def seconds(self, past: int, new: int) -> float:
            calls["head"] += past == 0
            return PrefillCost.seconds(self, past, new)

    prefill = Counting(fixed_s=PREFILL.fixed_s, per_token_s=PREFILL.per_token_s,
                       per_token_ctx_s=PREFILL.per_token_ctx_s)
    n = 4000
    cost = CostModel(links=(LinkCost(bandwidth_Bps=50e9), DISK), prefill=prefill, stages=32)
    for level, splits in ((0, False), (1, True)):
        calls["head"] = 0
        plan = cost.plan([level] * n, total_tokens=n * C + 256, tokens_per_chunk=C, chunk_bytes=CB, split=True)
        assert plan.is_split == splits and plan.load_chunks == n
        assert calls["head"] < 4 * n


def test_split_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvtier.policy.cost"):
        plan = model(DISK).plan([0] * 128, total_tokens=128 * C + 256, tokens_per_chunk=C, chunk_bytes=CB,
                                split=True)
    assert f"split: compute {plan.compute_chunks} chunks while loading" in caplog.text


@given(levels=st.lists(st.integers(0, 2), max_size=30), extra=st.integers(0, 600),
       bws=st.tuples(*(st.floats(1e7, 1e12) for _ in range(3))), stages=st.integers(1, 64),
       margin=st.sampled_from([0.0, 0.25]))
def test_split_plan_is_the_cheapest(levels: list[int], extra: int, bws: tuple[float, float, float],
                                    stages: int, margin: float) -> None:
    """Brute force over every (c, k): no pure decision is estimated cheaper; a split is chosen
    exactly when the cheapest split beats the best pure decision by ``split_margin``."""
    cost = CostModel(links=tuple(LinkCost(bandwidth_Bps=b, latency_s=1e-3) for b in bws), prefill=PREFILL,
                     stages=stages, split_margin=margin)
    total = len(levels) * C + extra
    plan = cost.plan(levels, total_tokens=total, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    assert 0 <= plan.compute_chunks <= plan.load_chunks <= plan.cached_chunks
    assert plan.compute_chunks < plan.load_chunks or plan.load_chunks == 0
    plain = cost.plan(levels, total_tokens=total, tokens_per_chunk=C, chunk_bytes=CB)
    assert plan.est_total_s <= plain.est_total_s * (1 + 1e-9)
    splits = [_split_total(cost, levels, total, c, k) for k in range(2, plan.cached_chunks + 1) for c in range(1, k)]
    if plan.is_split:
        assert plan.est_total_s < (1 - margin) * plain.est_total_s
        assert all(plan.est_total_s <= t * (1 + 1e-9) for t in splits)
    else:
        assert all(t >= (1 - margin) * plain.est_total_s * (1 - 1e-9) for t in splits)


def test_a_split_must_win_by_the_margin() -> None:
    """A split that wins by less than ``split_margin`` on paper loses in practice (H200 run 10,
    warm page cache): the plan then loads."""
    n = 64
    warm = model(LinkCost(bandwidth_Bps=14e9))
    kwargs = dict(total_tokens=n * C + 256, tokens_per_chunk=C, chunk_bytes=CB, split=True)
    eager = CostModel(links=warm.links, prefill=PREFILL, split_margin=0.0).plan([0] * n, **kwargs)
    careful = CostModel(links=warm.links, prefill=PREFILL, split_margin=0.99 - 1e-9).plan([0] * n, **kwargs)
    assert eager.is_split and not careful.is_split
    assert careful.est_total_s == min(careful.est_recompute_s, careful.est_total_s)
    with pytest.raises(ValueError, match="split_margin"):
        CostModel(links=warm.links, prefill=PREFILL, split_margin=1.0)
