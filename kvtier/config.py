"""Typed configuration: one frozen dataclass per component, validated on construction.

Sources, later wins: defaults < file (TOML or YAML) < environment.  With no file and no
environment the defaults work: DRAM 2 GiB, disk 20 GiB under the user cache dir, 256-token
chunks.  Environment overrides name a field by its path, upper-cased, ``__`` between levels::

    KVTIER_CHUNK_TOKENS=512
    KVTIER_DRAM__CAPACITY=8GiB
    KVTIER_TIERS=dram,disk,redis
    KVTIER_CONFIG=/etc/kvtier.toml      (the file to read, if no path is passed)

Sizes accept integers or strings with units (``512MiB``, ``2GiB``, ``1.5GB``).  Unknown keys are
errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from kvtier.errors import ConfigError

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


class ByteSize(int):
    """An int that config parsing reads from ``"2GiB"``-style strings."""


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a size (examples: 1048576, 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


@dataclass(frozen=True, kw_only=True)
class DramConfig:
    capacity: ByteSize = ByteSize(2 * GiB)
    pin_memory: bool | None = None  # None: pinned when CUDA is available
    prefault: bool = True  # populate the pool's pages at start (no page faults on the hot path)


@dataclass(frozen=True, kw_only=True)
class DiskConfig:
    path: Path = field(default_factory=lambda: default_cache_dir() / "chunks")
    capacity: ByteSize = ByteSize(20 * GiB)
    fsync: bool = True  # fsync file and directory before a put returns (crash safety)
    io_threads: int = 4


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """Circuit breaker of a remote tier: open after N failures, retry after a growing backoff."""

    failure_threshold: int = 3
    base_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ConfigError("breaker.failure_threshold must be at least 1")
        if not 0 < self.base_backoff_s <= self.max_backoff_s:
            raise ConfigError("breaker backoff needs 0 < base_backoff_s <= max_backoff_s")


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"  # rediss:// for TLS; a cluster seed node in cluster mode
    cluster: bool = False
    username: str | None = None  # ACL user
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    key_prefix: str = "kvtier"  # one per deployment; keys are <prefix>:<layout>:<key hex>
    ttl_s: int | None = None  # expire chunks after this long (None: rely on maxmemory policy)
    socket_timeout_s: float = 0.5
    connect_timeout_s: float = 0.5
    max_connections: int = 32  # per server, for this process
    staging_bytes: ByteSize = ByteSize(128 << 20)  # put buffers kept for reuse (header + payload each)
    capacity: ByteSize = ByteSize(1 << 40)  # what this process may write; the server evicts too
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, kw_only=True)
class MooncakeConfig:
    master_address: str = "127.0.0.1:50051"
    metadata_server: str = "http://127.0.0.1:8080/metadata"
    local_hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: ByteSize = ByteSize(512 << 20)  # memory this client contributes
    local_buffer_size: ByteSize = ByteSize(256 << 20)
    capacity: ByteSize = ByteSize(1 << 40)
    key_prefix: str = "kvtier"  # one per deployment; keys are <prefix>:<layout>:<key hex>
    timeout_s: float = 2.0  # give up on one batch call after this long (the client retries ~4 s)
    staging_bytes: ByteSize = ByteSize(256 << 20)  # registered buffers for zero-copy transfers
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, kw_only=True)
class KVTierConfig:
    chunk_tokens: int = 256
    tiers: tuple[str, ...] = ("dram", "disk")  # top (fastest) first
    eviction: Literal["lru", "lru-prefix", "s3fifo", "agent"] = "lru-prefix"  # see kvtier/policy/eviction.py
    promotion: Literal["always", "never"] = "always"  # copy lower-tier hits into the top tier
    write_through: bool = True  # also write new chunks to persistent/shared tiers, in background
    exclusive: bool = False  # tiers hold different chunks (demote on eviction); see kvtier/hierarchy.py
    write_through_share: float = 0.0  # exclusive: leading share of each stored batch still written through
    tenant: str = ""  # salt: different tenants never share chunks
    dram: DramConfig = field(default_factory=DramConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ConfigError("chunk_tokens must be positive")
        if not self.tiers:
            raise ConfigError("at least one tier is needed")
        if len(set(self.tiers)) != len(self.tiers):
            raise ConfigError(f"tiers lists a tier twice: {self.tiers}")


# --- building dataclasses from plain data -----------------------------------------------------

def from_dict(cls: type[Any], data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, converting and checking every field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; "
                          f"known: {sorted(names)}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}".lstrip("."))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(get_args(tp)[0], item.strip() if isinstance(item, str) else item, where)
                     for item in items)
    if tp is ByteSize:
        return ByteSize(parse_size(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is Path:
        return Path(os.path.expanduser(str(value)))
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _env_overrides(env: Mapping[str, str], prefix: str = "KVTIER_") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(prefix) or name == prefix + "CONFIG":
            continue
        path = name[len(prefix):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {part} is not a section")
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {p} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{p}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"{p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table/mapping")
    return data


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> KVTierConfig:
    """Defaults < file < ``overrides`` < environment."""
    env = os.environ if env is None else env
    path = path or env.get("KVTIER_CONFIG")
    data: dict[str, Any] = read_file(path) if path else {}
    data = _merge(data, overrides or {})
    data = _merge(data, _env_overrides(env))
    config: KVTierConfig = from_dict(KVTierConfig, data)
    return config
