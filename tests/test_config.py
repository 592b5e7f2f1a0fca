from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import GiB, KVTierConfig, load_config, parse_size
from kvtier.errors import ConfigError


def test_defaults_work_with_nothing() -> None:
    c = load_config(env={})
    assert c.chunk_tokens == 256 and c.dram.capacity == 2 * GiB and c.disk.capacity == 20 * GiB
    assert c.tiers == ("dram", "disk") and str(c.disk.path).endswith("kvtier/chunks")


def test_file_then_env_override(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('chunk_tokens = 512\ntiers = ["dram"]\n[dram]\ncapacity = "8GiB"\n[disk]\nfsync = false\n')
    c = load_config(toml, env={"KVTIER_DRAM__CAPACITY": "1GiB", "KVTIER_TENANT": "acme"})
    assert c.chunk_tokens == 512 and c.tiers == ("dram",) and c.dram.capacity == GiB
    assert c.disk.fsync is False and c.tenant == "acme"
    yaml = tmp_path / "k.yaml"
    yaml.write_text("disk:\n  path: /tmp/x\n  capacity: 3GB\nredis:\n  cluster: true\n")
    c = load_config(yaml, env={"KVTIER_TIERS": "dram,disk,redis"})
    assert c.disk.path == Path("/tmp/x") and c.disk.capacity == 3 * 10**9
    assert c.redis.cluster and c.tiers == ("dram", "disk", "redis")


@pytest.mark.parametrize("data, match", [
    ({"chunk_tokenz": 5}, "unknown config key"),
    ({"dram": {"capacty": 5}}, "unknown config key"),
    ({"chunk_tokens": "many"}, "integer"),
    ({"eviction": "mru"}, "not one of"),
    ({"dram": {"capacity": "2 parsecs"}}, "size"),
    ({"chunk_tokens": 0}, "positive"),
    ({"tiers": ["dram", "dram"]}, "twice"),
    ({"disk": {"fsync": "maybe"}}, "true/false"),
])
def test_bad_values_are_clear_errors(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(env={}, overrides=data)


def test_env_with_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        load_config(env={"KVTIER_DRAMM__CAPACITY": "1GiB"})


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 << 20 and parse_size(" 1.5 GiB ") == 3 << 29 and parse_size(42) == 42


def test_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("chunk_tokens = [")
    with pytest.raises(ConfigError, match=r"x\.toml"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    assert isinstance(KVTierConfig(), KVTierConfig)
