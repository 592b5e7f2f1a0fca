"""``kvtier bench opinions``: prefetch and the cost model, each on and off, on a small agent workload."""

from __future__ import annotations

import argparse

import pytest

from bench import opinions
from bench.sim.costmodel import CostModel, Link, model_shape
from bench.sim.sim import prepare
from bench.sim.workloads.synthetic import AgentWorkload, generate
from kvtier.errors import ConfigError

COST = CostModel(shape=model_shape("llama-3.1-8b"),
                 links={"dram": Link(bandwidth_Bps=50e9), "disk": Link(bandwidth_Bps=1.5e9, latency_s=1e-4)})


def test_four_rows_and_the_cost_model_never_loses() -> None:
    work = prepare(generate(AgentWorkload(sessions=8, turns=10, system_tokens=4000, tool_result_tokens=800,
                                          subagent_prob=0.0, seed=3)))
    result = opinions.measure("agents", work, COST, g2=5.0, g3=100.0, policy="agent", prefetch_share=0.25)
    rows = {(r["prefetch"], r["cost_model"]): r for r in result["rows"]}
    assert set(rows) == {(False, True), (False, False), (True, True), (True, False)}
    for prefetch in (False, True):
        on, off = rows[(prefetch, True)], rows[(prefetch, False)]
        assert on["hit_rate"] == off["hit_rate"] and on["dram_share_of_hits"] == off["dram_share_of_hits"]
        assert on["ttft_mean_s"] <= off["ttft_mean_s"] + 1e-12  # the decision only ever saves time
        assert 0.0 <= on["dram_share_of_hits"] <= 1.0
    assert rows[(True, True)]["prefetch_stats"]["prefetched"] > 0 and not rows[(False, True)]["prefetch_stats"]
    assert result["recompute"]["ttft_p50_s"] >= rows[(False, True)]["ttft_p50_s"]
    table = opinions.markdown(result, "figures")
    assert table.count("\n| o") == 4 and "TTFT figures: figures" in table


def test_bad_arguments_are_one_line_errors() -> None:
    parser = argparse.ArgumentParser()
    opinions.add_arguments(parser)
    with pytest.raises(ConfigError, match="nothing to replay"):
        opinions.run(parser.parse_args([]))
    with pytest.raises(ConfigError, match="prefetch-share"):
        opinions.run(parser.parse_args(["--synthetic", "0", "--prefetch-share", "0"]))
