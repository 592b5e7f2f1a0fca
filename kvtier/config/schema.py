"""The config's schema: one frozen, keyword-only dataclass per component, checked on construction.

Every field is checked when its dataclass is built (``kvtier.config_checks``, reading each field's
``_rule``): a bad value is a one-line ``ConfigFieldError`` naming ``Class.field``, which
``kvtier.config.loader`` re-labels with where the value came from.  Tiers must be known (built in,
or ``register_tier``-ed) and listed top first (dram, disk, then redis/mooncake); TLS files must
exist.  With no file and no environment the defaults work: DRAM 2 GiB, disk 20 GiB under the user
cache dir, 256-token chunks.

Secrets: a password in ``redis.url`` moves to ``redis.password``, which no ``repr`` shows;
``redacted(config)`` is what ``kvtier config`` prints (passwords as ``***``).  ``check_openable``
is what opening needs beyond a valid config (tier packages, a writable disk root, the memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvtier.config_checks import (
    ByteSize,
    at_least,
    check_redis_url,
    host_port,
    hostname,
    key_prefix,
    metadata_server,
    nonempty,
    positive,
    readable_file,
    redact_url,
    split_url_password,
    validate,
)
from kvtier.config_node import NodeConfig
from kvtier.errors import ConfigFieldError

GiB = 1 << 30

# Built-in tiers, top (fastest) first: a config lists them in this order.  ``node`` is DRAM shared by a
# node's processes (``kvtier serve``, kvtier/config_node.py); Redis and Mooncake are shared G4 stores.
TIER_LEVELS = {"dram": 0, "node": 0, "disk": 1, "redis": 2, "mooncake": 2}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


def _rule(check: Any = None, *, secret: bool = False, url: bool = False) -> dict[str, Any]:
    """Field metadata read by ``validate``: a check (value -> problem or None), secret, URL."""
    return {"check": check, "secret": secret, "url": url}


@dataclass(frozen=True, kw_only=True)
class DramConfig:
    capacity: ByteSize = field(default=ByteSize(2 * GiB), metadata=_rule(positive))
    pin_memory: bool | None = None  # None: pinned when CUDA is available
    prefault: bool = True  # populate the pool's pages at start (no page faults on the hot path)

    def __post_init__(self) -> None:
        validate(self)


def _disk_root(path: Path) -> str | None:
    if str(path) in ("", "."):
        return "must name a directory"
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    return None


@dataclass(frozen=True, kw_only=True)
class DiskConfig:
    path: Path = field(default_factory=lambda: default_cache_dir() / "chunks", metadata=_rule(_disk_root))
    capacity: ByteSize = field(default=ByteSize(20 * GiB), metadata=_rule(positive))
    fsync: bool = True  # fsync file and directory before a put returns (crash safety)
    io_threads: int = field(default=4, metadata=_rule(at_least(1, 256)))
    # "private": files 0600, directories 0700 (whatever the umask); "group": 0640 / 02770, for
    # processes of several users in the root's group sharing one root
    mode: Literal["private", "group"] = "private"

    def __post_init__(self) -> None:
        validate(self)


def _share(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


@dataclass(frozen=True, kw_only=True)
class PrefetchConfig:
    # share of the top tier (DRAM) that chunks prefetched during an agent's tool pause may fill
    # before they are read (kvtier/prefetch.py); 0: no prefetch
    dram_share: float = field(default=0.25, metadata=_rule(_share))

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """Circuit breaker of a remote tier: open after N failures, retry after a growing backoff."""

    failure_threshold: int = field(default=3, metadata=_rule(at_least(1)))
    base_backoff_s: float = field(default=0.5, metadata=_rule(positive))
    max_backoff_s: float = field(default=30.0, metadata=_rule(positive))

    def __post_init__(self) -> None:
        validate(self)
        if self.max_backoff_s < self.base_backoff_s:
            raise ConfigFieldError("BreakerConfig.max_backoff_s", f"must be at least base_backoff_s "
                                   f"({self.base_backoff_s}), got {self.max_backoff_s}")


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """A password in ``url`` (``redis://user:pw@host``) moves to ``password``: no secret in the URL."""

    # rediss:// for TLS; a cluster seed node in cluster mode
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=_rule(url=True))
    cluster: bool = False
    username: str | None = None  # ACL user
    password: str | None = field(default=None, repr=False, metadata=_rule(secret=True))
    tls_ca_file: str | None = field(default=None, metadata=_rule(readable_file))
    tls_cert_file: str | None = field(default=None, metadata=_rule(readable_file))
    tls_key_file: str | None = field(default=None, metadata=_rule(readable_file))  # only the path is shown
    key_prefix: str = field(default="kvtier", metadata=_rule(key_prefix))  # keys: <prefix>:<layout>:<key hex>
    ttl_s: int | None = field(default=None, metadata=_rule(at_least(1)))  # None: rely on maxmemory policy
    socket_timeout_s: float = field(default=0.5, metadata=_rule(positive))
    connect_timeout_s: float = field(default=0.5, metadata=_rule(positive))
    # a whole call (one batch, every shard, every read) gives up after this long: a counted miss
    deadline_s: float = field(default=1.0, metadata=_rule(positive))
    max_connections: int = field(default=32, metadata=_rule(at_least(1)))  # per server, for this process
    staging_bytes: ByteSize = ByteSize(128 << 20)  # put buffers kept for reuse (header + payload each)
    # what this process may write; the server evicts too
    capacity: ByteSize = field(default=ByteSize(1 << 40), metadata=_rule(positive))
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        validate(self)
        if (problem := check_redis_url(self.url, cluster=self.cluster)) is not None:
            raise ConfigFieldError("RedisConfig.url", f"{problem}, got {redact_url(self.url)!r}")
        url, password = split_url_password(self.url)
        if password is not None:
            if self.password is not None and self.password != password:
                raise ConfigFieldError("RedisConfig.url", "carries a password and so does password: keep one")
            object.__setattr__(self, "url", url)
            object.__setattr__(self, "password", password)
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigFieldError("RedisConfig.tls_key_file", "needs tls_cert_file (the certificate of that key)")


@dataclass(frozen=True, kw_only=True)
class MooncakeConfig:
    master_address: str = field(default="127.0.0.1:50051", metadata=_rule(host_port))
    metadata_server: str = field(default="http://127.0.0.1:8080/metadata", metadata=_rule(metadata_server, url=True))
    local_hostname: str = field(default="127.0.0.1", metadata=_rule(hostname))
    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    global_segment_size: ByteSize = ByteSize(512 << 20)  # memory this client contributes (0: none)
    local_buffer_size: ByteSize = ByteSize(256 << 20)
    capacity: ByteSize = field(default=ByteSize(1 << 40), metadata=_rule(positive))
    key_prefix: str = field(default="kvtier", metadata=_rule(key_prefix))  # keys: <prefix>:<layout>:<key hex>
    # give up on one batch call after this long (the client retries ~4 s)
    timeout_s: float = field(default=2.0, metadata=_rule(positive))
    # a whole tier call (set-up wait, staging waits, every round) gives up after this long
    deadline_s: float = field(default=4.0, metadata=_rule(positive))
    staging_bytes: ByteSize = ByteSize(256 << 20)  # registered buffers for zero-copy transfers
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        validate(self)

    def __repr__(self) -> str:  # the metadata URL may carry credentials
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["metadata_server"] = redact_url(self.metadata_server)
        return f"MooncakeConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _tiers(tiers: tuple[str, ...]) -> str | None:
    if not tiers:
        return "at least one tier is needed"
    if any(not name or name != name.strip() for name in tiers):
        return "a tier name is empty or has spaces"
    known = set(TIER_LEVELS) | registered_tiers()
    for name in tiers:
        if name not in known:
            return f"unknown tier {name!r} (known: {sorted(known)})"
        if tiers.count(name) > 1:
            return f"{name!r} is listed twice"
    levels = [(TIER_LEVELS[n], n) for n in tiers if n in TIER_LEVELS]
    for (a, upper), (b, lower) in itertools.pairwise(levels):
        if b < a:
            return f"{lower!r} must come before {upper!r} (top, fastest tier first)"
    return None


def _secret_file(path: Path) -> str | None:
    return readable_file(str(path)) or (None if path.stat().st_size else "is empty")


def registered_tiers() -> set[str]:
    """Tier names the registry knows now (built-in and ``register_tier``-ed)."""
    from kvtier import tiers

    return set(tiers._REGISTRY)


@dataclass(frozen=True, kw_only=True)
class KVTierConfig:
    chunk_tokens: int = field(default=256, metadata=_rule(positive))
    tiers: tuple[str, ...] = field(default=("dram", "disk"), metadata=_rule(_tiers))  # top (fastest) first
    eviction: Literal["lru", "lru-prefix", "s3fifo", "agent"] = "agent"  # kvtier/policy/registry.py
    promotion: Literal["always", "never"] = "always"  # copy lower-tier hits into the top tier
    write_through: bool = True  # also write new chunks to persistent/shared tiers, in background
    exclusive: bool = False  # tiers hold different chunks (demote on eviction); see kvtier/hierarchy.py
    write_through_share: float = 0.0  # exclusive: leading share of each stored batch still written through
    tenant: str = ""  # salt: different tenants never share chunks (a name, not a secret: kvtier/keys.py)
    # keyed salt: another tenant cannot compute your keys without it (KVTIER_TENANT_SECRET); never shown
    tenant_secret: str | None = field(default=None, repr=False, metadata=_rule(nonempty, secret=True))
    tenant_secret_file: Path | None = field(default=None, metadata=_rule(_secret_file))  # or read it from here
    dram: DramConfig = field(default_factory=DramConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)
    node: NodeConfig = field(default_factory=NodeConfig)  # the ``node`` tier's service: kvtier/config_node.py
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    def __post_init__(self) -> None:
        validate(self)
        if self.tenant_secret is not None and self.tenant_secret_file is not None:
            raise ConfigFieldError("KVTierConfig.tenant_secret_file", "tenant_secret is set too: keep one")


def read_tenant_secret(config: KVTierConfig) -> bytes | None:
    """The tenant secret (``tenant_secret``, or ``tenant_secret_file``'s contents less the final
    newline), or None for a name-only salt.  Read at each call; never logged."""
    if config.tenant_secret is not None:
        return config.tenant_secret.encode()
    if config.tenant_secret_file is None:
        return None
    try:
        secret = config.tenant_secret_file.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigFieldError("tenant_secret_file", f"cannot read {str(config.tenant_secret_file)!r}: "
                               f"{exc.strerror or exc}") from None
    if not secret:
        raise ConfigFieldError("tenant_secret_file", f"{str(config.tenant_secret_file)!r} holds no secret")
    return secret


def redacted(config: Any) -> dict[str, Any]:
    """A config dataclass as plain data to print: secrets as ``"***"``, URLs without passwords."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = redacted(value)
        elif f.metadata.get("secret") and value is not None:
            value = "***"
        elif f.metadata.get("url") and isinstance(value, str):
            value = redact_url(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def check_openable(config: KVTierConfig) -> None:
    """What ``ContextMemory.open`` needs beyond a valid config: tier packages, a creatable disk root."""
    needs = {"redis": ("redis", "redis"), "mooncake": ("mooncake.store", "mooncake")}
    for tier in config.tiers:
        if tier in needs and not _importable(needs[tier][0]):
            raise ConfigFieldError("tiers", f"tier {tier!r} needs the Python package of kvtier's "
                                   f"{needs[tier][1]!r} extra: pip install 'kvtier[{needs[tier][1]}]'")
    if "disk" in config.tiers and (problem := _disk_root_problem(config.disk.path)) is not None:
        raise ConfigFieldError("disk.path", problem)
    memory = _physical_memory()
    if "dram" in config.tiers and memory and config.dram.capacity > memory:
        raise ConfigFieldError("dram.capacity", f"{config.dram.capacity} bytes is more than this machine's "
                               f"memory ({memory} bytes, {memory / GiB:.1f} GiB)")


def _disk_root_problem(path: Path) -> str | None:
    """Why the disk tier cannot keep chunks under ``path``, or None.

    Tried for real (create the directories, write a file, then remove what was created), since
    ``os.access`` says yes to root for ``/proc`` and read-only mounts alike.
    """
    created: list[Path] = []
    existing = path
    while not existing.exists() and existing != existing.parent:
        created.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {str(path)!r}: {str(existing)!r} is not a writable directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot create {str(path)!r} or write in it: {exc.strerror or exc}"
    finally:
        for directory in created:  # deepest first: leave the file system as it was
            with contextlib.suppress(OSError):
                directory.rmdir()
    return None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):  # not on this platform
        return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # the parent package is missing
        return False
