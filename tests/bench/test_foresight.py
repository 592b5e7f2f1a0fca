"""Foresight references: the agent policy told deaths, next-use classes or exact next uses."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from bench.sim.foresight import ForesightModel, family
from bench.sim.sim import TierSpec, prefix_bound, prepare, simulate
from bench.sim.workloads.stream import Request
from bench.sim.workloads.synthetic import AgentWorkload, generate
from bench.tight import rate
from bench.trace import cost_model
from kvtier.cli import main
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.policy.agent_state import _DEAD


def _request(t: float, ids: tuple[int, ...]) -> Request:
    return Request(time_s=t, session="s", scope="test", hash_ids=ids, block_tokens=64, input_tokens=64 * len(ids),
                   output_tokens=1)


@pytest.fixture
def three():
    """a, b at 0; a, b, c at 5; a at 30: next uses a 5, 30, never; b 5, never; c never."""
    work = prepare([_request(0, (1, 2)), _request(5, (1, 2, 3)), _request(30, (1,))])
    keys = [[ChunkKey(k.to_bytes(16, "little")) for k in ks] for ks in work.keys]
    return work, keys


def test_each_tell_predicts_from_the_next_use(three) -> None:
    work, keys = three
    told = {tell: ForesightModel(work, tell, split_s=10) for tell in ("deaths", "classes", "next-use")}
    assert (told["classes"].short_s, told["classes"].long_s) == (5.0, 25.0)  # gaps 5, 5 short; 25 long
    for model in told.values():
        model.observe(keys[0], session="s", now=0.0)
    a, b = keys[0]
    assert told["next-use"].predict(a) == (5.0, 0) and told["next-use"].predict(b) == (5.0, 1)
    assert told["classes"].predict(a) == (5.0, 0)  # now + the short class's mean
    assert told["deaths"].predict(a)[0] not in (_DEAD, 5.0)  # alive: the agent's own guess
    for model in told.values():
        model.touch(a)
        model.touch(b)
        model.observe(keys[1], session="s", now=5.0)
        assert model.predict(keys[1][1])[0] == _DEAD and model.predict(keys[1][2])[0] == _DEAD  # b, c: last use
    assert told["next-use"].predict(a) == (30.0, 0)
    assert told["classes"].predict(a) == (30.0, 0)  # 5 + the long class's mean, 25


def test_replaying_another_workload_is_refused(three) -> None:
    work, keys = three
    model = ForesightModel(work, "deaths")
    with pytest.raises(ConfigError, match="request 0 has 3 chunks, the workload 2"):
        model.observe(keys[1])
    with pytest.raises(ConfigError, match="unknown foresight 'future'"):
        family(work, "future")
    with pytest.raises(ConfigError, match="split_s must be > 0"):
        family(work, "classes", split_s=0)


def test_told_every_next_use_the_agent_reaches_the_bound() -> None:
    """MIN's knowledge in the agent's heaps gives the prefix bound's hits (here 0.64x without it)."""
    work = prepare(generate(AgentWorkload(sessions=10, turns=12, tool_result_tokens=400, system_tokens=2000, seed=3)))
    cost = cost_model(Namespace(model="llama-3.1-8b", cost_model="modelled", gpu_flops=5.7e14, dram_gbps=None,
                                disk_gbps=None, disk_latency_ms=None, remote_gbps=None, remote_latency_ms=None))
    chunk = cost.shape.layout.bytes_per_token * work.chunk_tokens
    capacity = work.unique_chunks // 20 * chunk
    specs = [TierSpec(name="dram", capacity_bytes=capacity)]
    bound = rate(prefix_bound(work, cost, capacity))
    agent = rate(simulate(work, cost, specs, policy="agent"))
    told = rate(simulate(work, cost, specs, policy="agent", family=family(work, "next-use")))
    assert agent < 0.8 * bound and told == pytest.approx(bound, rel=0.02)


def test_tight_cli_adds_the_told_columns(tiny_mooncake: Path, tmp_path: Path, capsys) -> None:
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    rc = main(["bench", "tight", str(tiny_mooncake), "--g2", "30%", "--g2-g3", "30%+30%", "--policy", "lru,agent",
               "--cost-model", "modelled", "--foresight", "deaths,next-use", "--json", str(out), "--md", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["foresight"] == ["deaths", "next-use"]
    for row in doc["traces"][0]["rows"]:
        assert set(row["foresight"]) == {"deaths", "next-use"} and 0 <= row["foresight"]["next-use"] <= 1
    assert "told next-use (/ bound)" in md.read_text()
    assert main(["bench", "tight", str(tiny_mooncake), "--foresight", "luck", "--cost-model", "modelled"]) == 2
    err = capsys.readouterr().err
    assert "--foresight: unknown 'luck'" in err and err.count("\n") == 1
