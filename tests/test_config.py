from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvtier.config import (
    BreakerConfig,
    DiskConfig,
    DramConfig,
    GiB,
    KVTierConfig,
    MooncakeConfig,
    RedisConfig,
    load_config,
    parse_size,
    redacted,
)
from kvtier.errors import ConfigError, KVTierError
from kvtier.layout import KVLayout


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


# --- hardening: every bad value is a one-line ConfigError naming the field and the value ---------

BAD_VALUES: list[tuple[dict[str, object], str, str]] = [  # (overrides, field named, text in the message)
    ({"chunk_tokens": 1.5}, "chunk_tokens", "1.5"),
    ({"chunk_tokens": 0}, "chunk_tokens", "positive, got 0"),
    ({"chunk_tokens": -256}, "chunk_tokens", "positive, got -256"),
    ({"chunk_tokens": True}, "chunk_tokens", "True"),
    ({"chunk_tokens": None}, "chunk_tokens", "None"),
    ({"chunk_tokens": [256]}, "chunk_tokens", "[256]"),
    ({"tiers": []}, "tiers", "at least one tier"),
    ({"tiers": ["disk", "dram"]}, "tiers", "'dram' must come before 'disk'"),
    ({"tiers": ["redis", "dram"]}, "tiers", "'dram' must come before 'redis'"),
    ({"tiers": ["dram", "mooncake", "disk"]}, "tiers", "'disk' must come before 'mooncake'"),
    ({"tiers": ["dram", "dsik"]}, "tiers", "unknown tier 'dsik'"),
    ({"tiers": ["dram", ""]}, "tiers", "empty"),
    ({"tiers": "dram,,disk"}, "tiers", "('dram', '', 'disk')"),
    ({"tiers": ["dram", "disk", "disk"]}, "tiers", "'disk' is listed twice"),
    ({"tiers": {"dram": 1}}, "tiers", "expected a list"),
    ({"eviction": "mru"}, "eviction", "'mru' is not one of"),
    ({"eviction": 3}, "eviction", "3 is not one of"),
    ({"promotion": "sometimes"}, "promotion", "'sometimes'"),
    ({"write_through": "maybe"}, "write_through", "'maybe'"),
    ({"write_through": 2}, "write_through", "2"),
    ({"tenant": ["acme"]}, "tenant", "expected a string"),
    ({"dram": 5}, "dram", "expected a table, got int 5"),
    ({"dram": {"capacity": -1}}, "dram.capacity", "negative, got -1"),
    ({"dram": {"capacity": 0}}, "dram.capacity", "positive, got 0"),
    ({"dram": {"capacity": "2 parsecs"}}, "dram.capacity", "'2 parsecs'"),
    ({"dram": {"capacity": 1.5}}, "dram.capacity", "1.5 is not a whole number of bytes"),
    ({"dram": {"capacity": "0.5B"}}, "dram.capacity", "'0.5B' is not a whole number"),
    ({"dram": {"capacity": "-1GiB"}}, "dram.capacity", "'-1GiB'"),
    ({"dram": {"capacity": True}}, "dram.capacity", "True"),
    ({"dram": {"capacity": "9999999TiB"}}, "dram.capacity", "below 2**63"),
    ({"dram": {"capacity": [1]}}, "dram.capacity", "[1]"),
    ({"dram": {"pin_memory": "sometimes"}}, "dram.pin_memory", "'sometimes'"),
    ({"dram": {"prefault": 1}}, "dram.prefault", "1"),
    ({"dram": {"capacty": 5}}, "", "unknown config key(s) ['capacty'] in dram"),
    ({"disk": {"capacity": -5}}, "disk.capacity", "-5"),
    ({"disk": {"capacity": "nan"}}, "disk.capacity", "'nan'"),
    ({"disk": {"io_threads": 0}}, "disk.io_threads", "at least 1, got 0"),
    ({"disk": {"io_threads": 10_000}}, "disk.io_threads", "at most 256, got 10000"),
    ({"disk": {"io_threads": 2.5}}, "disk.io_threads", "2.5"),
    ({"disk": {"path": []}}, "disk.path", "[]"),
    ({"disk": {"path": ""}}, "disk.path", "''"),
    ({"disk": {"path": 5}}, "disk.path", "5"),
    ({"disk": {"fsync": "maybe"}}, "disk.fsync", "'maybe'"),
    ({"redis": {"url": "http://127.0.0.1:6379"}}, "redis.url", "must start with redis://"),
    ({"redis": {"url": "redis://127.0.0.1:99999/0"}}, "redis.url", "bad port"),
    ({"redis": {"url": "redis://127.0.0.1:port/0"}}, "redis.url", "bad port"),
    ({"redis": {"url": "redis://127.0.0.1:0/0"}}, "redis.url", "bad port"),
    ({"redis": {"url": "redis:///0"}}, "redis.url", "names no host"),
    ({"redis": {"url": "redis://127.0.0.1/x"}}, "redis.url", "bad database number 'x'"),
    ({"redis": {"url": "redis://127.0.0.1 /0"}}, "redis.url", "spaces"),
    ({"redis": {"url": "redis://h:1/0?password=pw"}}, "redis.url", "query string"),
    ({"redis": {"url": "redis://h:1/3", "cluster": True}}, "redis.url", "only database 0"),
    ({"redis": {"url": "unix://"}}, "redis.url", "no socket path"),
    ({"redis": {"url": "unix:///tmp/r.sock", "cluster": True}}, "redis.url", "not a unix socket"),
    ({"redis": {"url": 6379}}, "redis.url", "'6379'"),
    ({"redis": {"socket_timeout_s": -1}}, "redis.socket_timeout_s", "positive, got -1.0"),
    ({"redis": {"connect_timeout_s": 0}}, "redis.connect_timeout_s", "positive, got 0.0"),
    ({"redis": {"socket_timeout_s": "nan"}}, "redis.socket_timeout_s", "finite"),
    ({"redis": {"socket_timeout_s": "inf"}}, "redis.socket_timeout_s", "finite"),
    ({"redis": {"socket_timeout_s": True}}, "redis.socket_timeout_s", "True"),
    ({"redis": {"max_connections": 0}}, "redis.max_connections", "at least 1, got 0"),
    ({"redis": {"ttl_s": 0}}, "redis.ttl_s", "at least 1, got 0"),
    ({"redis": {"ttl_s": -5}}, "redis.ttl_s", "got -5"),
    ({"redis": {"capacity": 0}}, "redis.capacity", "positive"),
    ({"redis": {"staging_bytes": -1}}, "redis.staging_bytes", "negative"),
    ({"redis": {"key_prefix": ""}}, "redis.key_prefix", "non-empty"),
    ({"redis": {"key_prefix": "a b"}}, "redis.key_prefix", "'a b'"),
    ({"redis": {"tls_ca_file": "/nonexistent/ca.pem"}}, "redis.tls_ca_file", "no such file, got '/nonexistent/ca.pem'"),
    ({"redis": {"tls_cert_file": "/nonexistent/c.pem"}}, "redis.tls_cert_file", "no such file"),
    ({"redis": {"tls_key_file": "/nonexistent/k.pem"}}, "redis.tls_key_file", "no such file"),
    ({"redis": {"tls_ca_file": "/"}}, "redis.tls_ca_file", "is not a file"),
    ({"redis": {"cluster": "sometimes"}}, "redis.cluster", "'sometimes'"),
    ({"redis": {"breaker": {"failure_threshold": 0}}}, "redis.breaker.failure_threshold", "at least 1"),
    ({"redis": {"breaker": {"base_backoff_s": 0}}}, "redis.breaker.base_backoff_s", "positive"),
    ({"redis": {"breaker": {"base_backoff_s": 2, "max_backoff_s": 1}}}, "redis.breaker.max_backoff_s",
     "at least base_backoff_s (2.0), got 1.0"),
    ({"redis": {"breaker": 3}}, "redis.breaker", "expected a table"),
    ({"mooncake": {"master_address": "nohost"}}, "mooncake.master_address", "host:port, got 'nohost'"),
    ({"mooncake": {"master_address": "h:0"}}, "mooncake.master_address", "'h:0'"),
    ({"mooncake": {"master_address": "h:70000"}}, "mooncake.master_address", "'h:70000'"),
    ({"mooncake": {"master_address": ":50051"}}, "mooncake.master_address", "':50051'"),
    ({"mooncake": {"metadata_server": ""}}, "mooncake.metadata_server", "P2PHANDSHAKE"),
    ({"mooncake": {"metadata_server": "ftp://h/m"}}, "mooncake.metadata_server", "'ftp://h/m'"),
    ({"mooncake": {"metadata_server": "http://"}}, "mooncake.metadata_server", "'http://'"),
    ({"mooncake": {"local_hostname": ""}}, "mooncake.local_hostname", "host name"),
    ({"mooncake": {"protocol": "udp"}}, "mooncake.protocol", "'udp' is not one of ['tcp', 'rdma']"),
    ({"mooncake": {"timeout_s": 0}}, "mooncake.timeout_s", "positive"),
    ({"mooncake": {"capacity": -1}}, "mooncake.capacity", "negative"),
    ({"mooncake": {"global_segment_size": "lots"}}, "mooncake.global_segment_size", "'lots'"),
    ({"mooncake": {"key_prefix": ""}}, "mooncake.key_prefix", "non-empty"),
    ({"mooncake": {"breaker": {"max_backoff_s": -1}}}, "mooncake.breaker.max_backoff_s", "positive"),
    ({"mooncake": {"device_name": ["mlx5_0"]}}, "mooncake.device_name", "expected a string"),
]


def _one_line_error(call: Callable[[], object], field: str, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, KVTierError) and "\n" not in message
    assert message.startswith(f"{field}: " if field else "unknown"), message
    assert text in message, message
    return message


@pytest.mark.parametrize(("data", "field", "text"), BAD_VALUES, ids=[repr(d) for d, _, _ in BAD_VALUES])
def test_every_bad_value_names_its_field(data: dict[str, object], field: str, text: str) -> None:
    _one_line_error(lambda: load_config(env={}, overrides=data), field, text)


BAD_ENV: list[tuple[dict[str, str], str, str]] = [
    ({"KVTIER_DRAM__CAPACITY": "banana"}, "KVTIER_DRAM__CAPACITY", "cannot read 'banana' as a size"),
    ({"KVTIER_TIERS": "dram,,disk"}, "KVTIER_TIERS", "empty"),
    ({"KVTIER_TIERS": "disk,dram"}, "KVTIER_TIERS", "must come before"),
    ({"KVTIER_TIERS": ""}, "KVTIER_TIERS", "empty"),
    ({"KVTIER_CHUNK_TOKENS": "1.5"}, "KVTIER_CHUNK_TOKENS", "'1.5'"),
    ({"KVTIER_DISK__IO_THREADS": "0"}, "KVTIER_DISK__IO_THREADS", "at least 1"),
    ({"KVTIER_REDIS__SOCKET_TIMEOUT_S": "-1"}, "KVTIER_REDIS__SOCKET_TIMEOUT_S", "positive"),
    ({"KVTIER_REDIS__URL": "redis://h:99999"}, "KVTIER_REDIS__URL", "bad port"),
    ({"KVTIER_REDIS__TLS_CA_FILE": "/nonexistent/ca.pem"}, "KVTIER_REDIS__TLS_CA_FILE", "no such file"),
    ({"KVTIER_REDIS__BREAKER__FAILURE_THRESHOLD": "0"}, "KVTIER_REDIS__BREAKER__FAILURE_THRESHOLD", "at least 1"),
    ({"KVTIER_DRAMM__CAPACITY": "1GiB"}, "KVTIER_DRAMM__CAPACITY", "unknown config key(s) ['dramm']"),
    ({"KVTIER_DRAM": "1GiB"}, "KVTIER_DRAM", "expected a table"),
    ({"KVTIER_DRAM__CAPACITY__X": "1"}, "KVTIER_DRAM__CAPACITY__X", "as a size"),
    ({"KVTIER_EVICTION": "mru"}, "KVTIER_EVICTION", "'mru'"),
    ({"KVTIER_WRITE_THROUGH": "maybe"}, "KVTIER_WRITE_THROUGH", "'maybe'"),
    ({"KVTIER_MOONCAKE__PROTOCOL": "udp"}, "KVTIER_MOONCAKE__PROTOCOL", "'udp'"),
]


@pytest.mark.parametrize(("env", "field", "text"), BAD_ENV, ids=[next(iter(e)) for e, _, _ in BAD_ENV])
def test_every_bad_env_value_names_its_variable(env: dict[str, str], field: str, text: str) -> None:
    _one_line_error(lambda: load_config(env=env), field, text)


def test_file_values_are_named_with_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text("[dram]\ncapacity = -1\n")
    _one_line_error(lambda: load_config(toml, env={}), f"{toml}: dram.capacity", "negative, got -1")
    # the environment overrides the file, and is the one named
    _one_line_error(lambda: load_config(toml, env={"KVTIER_DRAM__CAPACITY": "x"}), "KVTIER_DRAM__CAPACITY", "'x'")
    assert load_config(toml, env={"KVTIER_DRAM__CAPACITY": "1GiB"}).dram.capacity == GiB


@pytest.mark.parametrize(("name", "content", "text"), [
    ("list.yaml", b"- dram\n- disk\n", "top level must be a table"),
    ("keys.yaml", b"1: 2\n", "unknown config key(s) [1]"),
    ("bad.yaml", b"dram: [\n", "bad.yaml"),
    ("unsafe.yaml", b"dram: !!python/object:os.system {}\n", "unsafe.yaml"),
    ("binary.toml", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("kvtier.ini", b"[dram]\n", "must end in .toml, .yaml or .yml"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, name: str, content: bytes, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(text)) as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})


def test_a_huge_bad_value_is_cut_in_the_message() -> None:
    message = _one_line_error(lambda: load_config(env={"KVTIER_DRAM__CAPACITY": "x" * 10**6}),
                              "KVTIER_DRAM__CAPACITY", "cannot read 'xxx")
    assert len(message) < 400 and message.endswith("...")


def test_bad_arguments_to_load_config() -> None:
    with pytest.raises(ConfigError, match="overrides must be a mapping"):
        load_config(env={}, overrides=[("chunk_tokens", 5)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a path, got 5"):
        load_config(5, env={})  # type: ignore[arg-type]


def test_a_disk_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    _one_line_error(lambda: load_config(env={}, overrides={"disk": {"path": str(tmp_path / "f")}}),
                    "disk.path", "exists and is not a directory")


@pytest.mark.parametrize(("build", "field", "text"), [
    (lambda: DramConfig(capacity=-1), "DramConfig.capacity", "negative, got -1"),
    (lambda: DramConfig(capacity="2GiB"), "DramConfig.capacity", "expected a size in bytes, got '2GiB'"),
    (lambda: DiskConfig(path=""), "DiskConfig.path", "''"),
    (lambda: DiskConfig(io_threads=True), "DiskConfig.io_threads", "True"),
    (lambda: DiskConfig(capacity=2.5), "DiskConfig.capacity", "2.5"),
    (lambda: KVTierConfig(tiers=("disk", "dram")), "KVTierConfig.tiers", "must come before"),
    (lambda: KVTierConfig(tiers="dram"), "KVTierConfig.tiers", "list of strings"),
    (lambda: KVTierConfig(chunk_tokens=1.5), "KVTierConfig.chunk_tokens", "1.5"),
    (lambda: KVTierConfig(eviction="mru"), "KVTierConfig.eviction", "'mru'"),
    (lambda: KVTierConfig(dram="big"), "KVTierConfig.dram", "expected a DramConfig"),
    (lambda: RedisConfig(url="redis://h:x/0"), "RedisConfig.url", "bad port"),
    (lambda: RedisConfig(socket_timeout_s=float("inf")), "RedisConfig.socket_timeout_s", "positive, got inf"),
    (lambda: RedisConfig(tls_key_file=__file__), "RedisConfig.tls_key_file", "needs tls_cert_file"),
    (lambda: MooncakeConfig(protocol="udp"), "MooncakeConfig.protocol", "'udp'"),
    (lambda: BreakerConfig(failure_threshold=0), "BreakerConfig.failure_threshold", "at least 1"),
    (lambda: BreakerConfig(base_backoff_s=2.0, max_backoff_s=1.0), "BreakerConfig.max_backoff_s", "got 1.0"),
])
def test_direct_construction_checks_too(build: Callable[[], object], field: str, text: str) -> None:
    _one_line_error(build, field, text)


def test_harmless_spellings_are_normalised(tmp_path: Path) -> None:
    c = KVTierConfig(tiers=["dram"], chunk_tokens=np.int64(64),  # type: ignore[arg-type]
                     disk=DiskConfig(path=str(tmp_path), capacity=1 << 20))  # type: ignore[arg-type]
    assert c.tiers == ("dram",) and type(c.chunk_tokens) is int and c.disk.path == tmp_path
    assert load_config(env={"KVTIER_TIERS": " dram , disk "}).tiers == ("dram", "disk")
    assert parse_size(1e9) == 10**9 and parse_size("1.5GB") == 1_500_000_000
    assert load_config(env={}, overrides={"tiers": ["dram", "disk", "redis", "mooncake"]}).tiers[-1] == "mooncake"


# --- secrets: never in a repr, a printout or a log line -------------------------------------------

SECRET = "s3cret-Pa55"


def test_a_url_password_moves_out_of_the_url() -> None:
    c = load_config(env={"KVTIER_REDIS__URL": f"redis://bob:{SECRET}@127.0.0.1:6379/0"})
    assert c.redis.url == "redis://bob@127.0.0.1:6379/0" and c.redis.password == SECRET
    assert load_config(env={"KVTIER_REDIS__URL": "redis://:p%40ss@h:1/0"}).redis.password == "p@ss"
    assert RedisConfig(url=f"redis://:{SECRET}@h:1/0", password=SECRET).url == "redis://h:1/0"
    message = _one_line_error(lambda: RedisConfig(url=f"redis://:{SECRET}@h:1/0", password="other"),
                              "RedisConfig.url", "keep one")
    assert SECRET not in message and "other" not in message
    message = _one_line_error(lambda: RedisConfig(url=f"redis://u:{SECRET}@h:99999/0"), "RedisConfig.url", "bad port")
    assert SECRET not in message and "u:***@h" in message
    message = _one_line_error(lambda: RedisConfig(password=12345), "RedisConfig.password", "got int")  # type: ignore
    assert "12345" not in message


def test_secrets_stay_out_of_repr_and_printouts(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text(f'[redis]\npassword = "{SECRET}"\n[mooncake]\nmetadata_server = "http://u:{SECRET}@h:1/m"\n')
    from_file = load_config(toml, env={})
    from_env = load_config(env={"KVTIER_REDIS__URL": f"rediss://u:{SECRET}@h:1/0"})
    for c in (from_file, from_env):
        assert c.redis.password == SECRET
        for text in (repr(c), str(c), repr(c.redis), repr(c.mooncake), json.dumps(redacted(c))):
            assert SECRET not in text
    assert redacted(from_file)["redis"]["password"] == "***"
    assert redacted(from_file)["mooncake"]["metadata_server"] == "http://u:***@h:1/m"
    assert redacted(KVTierConfig())["redis"]["password"] is None  # no password: nothing to hide


def test_a_failing_connection_logs_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    from bench.harness.servers import free_port
    from kvtier.tiers.redis import RedisTier
    from tests.conftest import make_keys

    layout = KVLayout(model="test/secrets", num_layers=1, num_kv_heads=1, head_dim=8, tokens_per_chunk=4)
    caplog.set_level(logging.DEBUG)
    errors = []
    for cluster in (False, True):
        url = f"redis://admin:{SECRET}@127.0.0.1:{free_port()}/0"
        config = load_config(env={"KVTIER_REDIS__URL": url, "KVTIER_REDIS__CLUSTER": str(cluster),
                                  "KVTIER_REDIS__CONNECT_TIMEOUT_S": "0.2"})
        tier = RedisTier(layout, config.redis)
        try:
            assert not tier.contains(make_keys(layout, 1)[0])
        except KVTierError as exc:
            errors.append(str(exc))
        finally:
            tier.close()
    assert "127.0.0.1" in caplog.text  # the failures were logged ...
    assert SECRET not in caplog.text and not any(SECRET in e for e in errors)  # ... without the password


def test_a_tenant_secret_comes_from_the_environment_or_a_file_and_is_never_shown(tmp_path: Path) -> None:
    from kvtier.config import read_tenant_secret

    from_env = load_config(env={"KVTIER_TENANT": "team-a", "KVTIER_TENANT_SECRET": SECRET})
    assert read_tenant_secret(from_env) == SECRET.encode()
    secret_file = tmp_path / "tenant.key"
    secret_file.write_text(SECRET + "\n")
    from_file = load_config(env={"KVTIER_TENANT_SECRET_FILE": str(secret_file)})
    assert read_tenant_secret(from_file) == SECRET.encode()  # the final newline is not part of it
    assert read_tenant_secret(KVTierConfig()) is None  # a name salt only
    for c in (from_env, from_file):
        for text in (repr(c), str(c), json.dumps(redacted(c))):
            assert SECRET not in text
    assert redacted(from_env)["tenant_secret"] == "***"
    assert redacted(from_file)["tenant_secret_file"] == str(secret_file)  # the path only
    message = _one_line_error(lambda: load_config(env={"KVTIER_TENANT_SECRET": "  "}), "KVTIER_TENANT_SECRET",
                              "must not be empty")
    assert "'  '" not in message
    (tmp_path / "empty.key").write_text("")
    _one_line_error(lambda: load_config(env={"KVTIER_TENANT_SECRET_FILE": str(tmp_path / "empty.key")}),
                    "KVTIER_TENANT_SECRET_FILE", "is empty")
    _one_line_error(lambda: load_config(env={"KVTIER_TENANT_SECRET_FILE": str(tmp_path / "none.key")}),
                    "KVTIER_TENANT_SECRET_FILE", "no such file")
    both = {"KVTIER_TENANT_SECRET": "a", "KVTIER_TENANT_SECRET_FILE": str(secret_file)}
    _one_line_error(lambda: load_config(env=both), "KVTIER_TENANT_SECRET_FILE", "keep one")


def test_a_keyed_tenant_gets_other_keys_than_its_name_alone(tmp_path: Path) -> None:
    from kvtier.hierarchy import ContextMemory

    layout = KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=8)
    base = {"tiers": ["dram"], "chunk_tokens": 8, "dram": {"capacity": "1MiB", "prefault": False}, "tenant": "team-a"}
    tokens = list(range(16))
    keys = {}
    for name, env in (("name", {}), ("keyed", {"KVTIER_TENANT_SECRET": SECRET}),
                      ("keyed again", {"KVTIER_TENANT_SECRET": SECRET})):
        memory = ContextMemory.open(layout, load_config(env=env, overrides=base))
        keys[name] = memory.keys_for(tokens)
        memory.close()
    assert keys["keyed"] == keys["keyed again"] and not set(keys["keyed"]) & set(keys["name"])
