"""The ``[node]`` section: defaults, one-line errors naming the field, and the embedded default untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import KVTierConfig, load_config
from kvtier.config_node import NodeConfig, socket_path
from kvtier.errors import ConfigFieldError


def test_the_embedded_default_is_unchanged() -> None:
    config = load_config(env={})
    assert config.tiers == ("dram", "disk")  # nothing talks to a service unless asked


def test_the_node_tier_is_one_field_away(tmp_path: Path) -> None:
    config = load_config(env={"KVTIER_TIERS": "node,disk", "KVTIER_NODE__URL": "unix:///run/kvtier/kvtier.sock"})
    assert config.tiers == ("node", "disk") and socket_path(config.node.url) == Path("/run/kvtier/kvtier.sock")
    file = tmp_path / "kvtier.toml"
    file.write_text('tiers = ["node", "disk"]\n[node]\nurl = "/run/kvtier/kvtier.sock"\ndeadline_s = 0.05\n')
    assert load_config(file, env={}).node == NodeConfig(url="/run/kvtier/kvtier.sock", deadline_s=0.05)


def test_the_default_socket_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert NodeConfig().url == "unix:///run/user/1000/kvtier/kvtier.sock"


@pytest.mark.parametrize(("env", "field", "text"), [
    ({"KVTIER_NODE__URL": "tcp://10.0.0.1:9000"}, "KVTIER_NODE__URL", "must be unix:///an/absolute/path"),
    ({"KVTIER_NODE__URL": "unix://relative.sock"}, "KVTIER_NODE__URL", "must be unix:///an/absolute/path"),
    ({"KVTIER_NODE__URL": "unix:///" + "x" * 200}, "KVTIER_NODE__URL", "at most 107"),
    ({"KVTIER_NODE__DEADLINE_S": "0"}, "KVTIER_NODE__DEADLINE_S", "must be positive"),
    ({"KVTIER_NODE__RETRY_S": "soon"}, "KVTIER_NODE__RETRY_S", "expected a number"),
    ({"KVTIER_NODE__PORT": "1"}, "KVTIER_NODE__PORT", "unknown config key"),
])
def test_bad_node_values_name_their_field(env: dict[str, str], field: str, text: str) -> None:
    with pytest.raises(ConfigFieldError, match=text) as info:
        load_config(env=env)
    assert str(info.value).startswith(field + ":") and "\n" not in str(info.value)


def test_direct_construction_checks_too() -> None:
    with pytest.raises(ConfigFieldError, match=r"NodeConfig\.url: must be unix://"):
        KVTierConfig(node=NodeConfig(url="http://x"))
