"""Cost model: calibration, monotonicity, overrides."""

from __future__ import annotations

import dataclasses

import pytest

from bench.sim.costmodel import CostModel, Link, model_shape
from kvtier.errors import ConfigError


def test_calibrated_to_llama_8b_32k_on_h100() -> None:
    cost = CostModel(shape=model_shape("llama-3.1-8b"))
    assert cost.prefill_s(0, 32_768) == pytest.approx(1.4, rel=0.05)


def test_prefill_grows_with_context_and_hits_are_cheaper() -> None:
    cost = CostModel(shape=model_shape("llama-3.1-70b"))
    assert cost.prefill_s(0, 64_000) > 2 * cost.prefill_s(0, 32_000)  # quadratic attention term
    assert cost.prefill_s(90_000, 1_000) < cost.prefill_s(0, 91_000) / 20
    assert cost.prefill_s(90_000, 1_000) > cost.prefill_s(0, 1_000)  # attention over the cached part


def test_links_and_overrides() -> None:
    shape = model_shape("qwen2.5-7b")
    cost = CostModel(shape=shape, links={"dram": Link(bandwidth_Bps=10e9), "remote": Link(2e9, latency_s=0.002)})
    assert cost.load_s({"dram": 10**10}) == pytest.approx(1.0)
    assert cost.load_s({"remote": 0}) == 0.0
    assert cost.load_s({"remote": 2 * 10**9}) == pytest.approx(1.002)
    assert cost.ttft_s(cached=0, new=100, bytes_per_tier={}) == pytest.approx(cost.overhead_s + cost.prefill_s(0, 100))


def test_shapes() -> None:
    assert model_shape("deepseek-v3").layout.num_kv_parts == 1
    custom = model_shape("custom:layers=4,kv_heads=2,head_dim=64,q_heads=8,params=1e8")
    assert custom.layout.bytes_per_token == 4 * 2 * 2 * 64 * 2
    with pytest.raises(ConfigError):
        model_shape("gpt-9")
    with pytest.raises(ConfigError):
        model_shape("custom:layers=4")


def test_measured_figures_and_fetch_or_recompute(tmp_path) -> None:
    import json

    from bench.sim.costmodel import measured, newest_measured

    shape = model_shape("llama-3.1-8b")
    prefill = {"fixed_s": 0.04, "per_token_s": 2.5e-5, "per_token_ctx_s": 1e-9}
    slow_disk = {"bandwidth_Bps": 1.0e9, "latency_s": 0.03}
    (tmp_path / "h200_run6_gpu_cost_model.json").write_text(json.dumps(
        {"links": [{"bandwidth_Bps": 5e10, "latency_s": 0.0}, slow_disk], "prefill": prefill, "stages": 1}))
    (tmp_path / "h200_run10_x_cost_model.json").write_text(json.dumps(
        {"links": [{"bandwidth_Bps": 4e10, "latency_s": 0.0}], "prefill": prefill, "stages": 1}))
    (tmp_path / "h100_run99_cost_model.json").write_text("not json: never read")
    cost = newest_measured(tmp_path, shape)  # run 10 beats run 6 (numeric, not text, order)
    assert cost.links["dram"].bandwidth_Bps == 4e10 and cost.links["disk"].bandwidth_Bps == 1e9
    assert "run10" in cost.source and "run6" in cost.source
    planner = cost.planner(["dram", "disk"])
    ctx, tpc = 4096, 256
    recompute = cost.request_ttft_s(planner, [0, 0], context=ctx, tokens_per_chunk=tpc)
    assert recompute == pytest.approx(cost.overhead_s + 0.04 + ctx * 2.5e-5 + ctx * ctx / 2 * 1e-9)
    # 8 DRAM chunks are worth loading; 8 chunks (256 MiB at 1 GB/s + 30 ms) from disk are not: recomputed
    assert cost.request_ttft_s(planner, [8, 0], context=ctx, tokens_per_chunk=tpc) < recompute
    no_split = dataclasses.replace(cost, split=False)  # vLLM's connector: a prefix load or nothing
    assert no_split.request_ttft_s(planner, [0, 8], context=ctx, tokens_per_chunk=tpc) == pytest.approx(recompute)
    assert cost.request_ttft_s(planner, [0, 8], context=ctx, tokens_per_chunk=tpc) <= recompute
    with pytest.raises(ConfigError, match="cost model"):
        measured(tmp_path / "h100_run99_cost_model.json", shape)
    with pytest.raises(ConfigError, match="no h200_run"):
        newest_measured(tmp_path / "empty", shape)


def test_a_slow_tier_hit_is_split_in_the_simulated_ttft() -> None:
    """A long disk hit: recomputing its head while its tail loads beats both pure decisions."""
    shape = model_shape("llama-3.1-8b")
    cost = CostModel(shape=shape, links={"dram": Link(bandwidth_Bps=50e9), "disk": Link(bandwidth_Bps=1.6e9)})
    planner = cost.planner(["dram", "disk"])
    ctx, tpc, n = 128 * 1024 + 256, 256, 512
    split = cost.request_ttft_s(planner, [0, n], context=ctx, tokens_per_chunk=tpc)
    plain = dataclasses.replace(cost, split=False).request_ttft_s(planner, [0, n], context=ctx, tokens_per_chunk=tpc)
    load = cost.overhead_s + n * tpc * shape.layout.bytes_per_token / 1.6e9 + cost.prefill_s(n * tpc, 256)
    assert split < 0.75 * min(plain, load)


def test_with_the_cost_model_off_every_cached_chunk_is_loaded() -> None:
    """``decide=False`` prices loading the whole hit (a disk slower than recomputing included);
    the engine's decision is never dearer, and cheaper where the disk loses."""
    shape = model_shape("llama-3.1-8b")
    cost = CostModel(shape=shape, links={"dram": Link(bandwidth_Bps=50e9), "disk": Link(bandwidth_Bps=1.5e9)})
    off = dataclasses.replace(cost, decide=False, split=False)
    planner = cost.planner(["dram", "disk"])
    tpc, n = 256, 16
    ctx = n * tpc + 100
    load_all = cost.overhead_s + n * tpc * shape.layout.bytes_per_token / 1.5e9 + cost.prefill_s(n * tpc, 100)
    assert off.request_ttft_s(planner, [0, n], context=ctx, tokens_per_chunk=tpc) == pytest.approx(load_all)
    on = cost.request_ttft_s(planner, [0, n], context=ctx, tokens_per_chunk=tpc)
    assert on < load_all  # 4K tokens from a 1.5 GB/s disk: recomputing (or splitting) wins
    for hit in ([n, 0], [n // 2, n // 2], [0, 1]):
        assert cost.request_ttft_s(planner, hit, context=ctx, tokens_per_chunk=tpc) <= \
            off.request_ttft_s(planner, hit, context=ctx, tokens_per_chunk=tpc) + 1e-12
    # a whole-prompt hit still computes one token
    full = off.request_ttft_s(planner, [n, 0], context=n * tpc, tokens_per_chunk=tpc)
    assert full == pytest.approx(off.overhead_s + (n - 1) * tpc * shape.layout.bytes_per_token / 50e9
                                 + cost.prefill_s((n - 1) * tpc, tpc))
