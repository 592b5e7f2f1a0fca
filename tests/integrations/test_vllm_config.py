"""kv_connector_extra_config -> typed config: known keys applied, unknown keys and bad sizes refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.errors import ConfigError
from kvtier.integrations.vllm_config import PagedGeometry, make_layout, parse_extra_config

GEOMETRY = PagedGeometry(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_size=64)


def test_keys_split_between_kvtier_and_connector(tmp_path: Path) -> None:
    config, options = parse_extra_config(
        {"chunk_tokens": 128, "tiers": ["dram", "disk"], "dram": {"capacity": "64MiB"},
         "disk": {"path": str(tmp_path)}, "stats_file": str(tmp_path / "s.json"), "log_interval_s": 0}, env={})
    assert config.chunk_tokens == 128 and config.dram.capacity == 64 << 20 and config.disk.path == tmp_path
    assert options.stats_file == tmp_path / "s.json" and options.log_interval_s == 0
    assert options.on_load_error == "recompute" and options.tool_call_tokens == ()
    _, options = parse_extra_config({"tool_call_tokens": [151657, 128010]}, env={})
    assert options.tool_call_tokens == (151657, 128010)


def test_environment_still_applies() -> None:
    config, _ = parse_extra_config({"chunk_tokens": 128}, env={"KVTIER_DRAM__CAPACITY": "1GiB"})
    assert config.dram.capacity == 1 << 30


@pytest.mark.parametrize(("extra", "message"), [
    ({"dram_size": "1GiB"}, r"unknown config key\(s\) \['dram_size'\]"),
    ({"dram": {"capacity": "lots"}}, "cannot read 'lots' as a size"),
    ({"on_load_error": "ignore"}, "is not one of"),
    ({"log_interval_s": -1}, "log_interval_s"),
    ({"tiers": ["dram", "dram"]}, "twice"),
    ({"tool_call_tokens": ["<tool_call>"]}, "tool_call_tokens: expected an integer"),
])
def test_bad_keys_are_errors(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_extra_config(extra, env={})


def test_chunk_must_be_whole_blocks() -> None:
    assert make_layout(GEOMETRY, chunk_tokens=256, model_id="m").tokens_per_chunk == 256
    with pytest.raises(ConfigError, match="multiple of vLLM's block_size=64"):
        make_layout(GEOMETRY, chunk_tokens=100, model_id="m")


def test_cost_model_file_is_loaded_and_checked(tmp_path: Path) -> None:
    from kvtier.integrations.vllm_config import load_cost_model
    from kvtier.policy.cost import CostModel, LinkCost, PrefillCost

    path = tmp_path / "cost.json"
    cost = CostModel(links=(LinkCost(bandwidth_Bps=50e9), LinkCost(bandwidth_Bps=2e9)),
                     prefill=PrefillCost(per_token_s=1e-4))
    cost.save(path)
    _, options = parse_extra_config({"cost_model": str(path)}, env={})
    assert load_cost_model(options, ["dram", "disk"]) == cost
    assert load_cost_model(parse_extra_config({}, env={})[1], ["dram"]) is None
    with pytest.raises(ConfigError, match=r"cost_model has 2 link\(s\) for the tiers"):
        load_cost_model(options, ["dram", "disk", "redis"])
    path.write_text("{}")
    with pytest.raises(ConfigError, match=r"cost_model=.*not a cost model"):
        load_cost_model(options, ["dram", "disk"])
    _, missing = parse_extra_config({"cost_model": str(tmp_path / "none.json")}, env={})
    with pytest.raises(ConfigError, match="cost_model="):
        load_cost_model(missing, ["dram"])


@pytest.mark.parametrize(("name", "message"), [
    ("missing/s.json", "directory '{tmp}/missing' does not exist"),
    ("", "'{tmp}' is a directory"),
])
def test_a_stats_file_that_cannot_be_written_is_a_start_up_error(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_extra_config({"stats_file": str(tmp_path / name) if name else str(tmp_path)}, env={})
    assert str(err.value).startswith("kv_connector_extra_config.stats_file: ")
    assert message.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the write test left nothing behind
