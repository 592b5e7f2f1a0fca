"""Cost model: calibration, monotonicity, overrides."""

from __future__ import annotations

import pytest

from kvtier.bench.costmodel import CostModel, Link, model_shape
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
