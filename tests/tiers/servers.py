"""Fixtures that run real G4 servers on loopback for a test module (import them by name).

    from tests.tiers.servers import redis_standalone, redis_cluster  # noqa: F401

Each fixture starts its servers once per module (fault tests build their own, since they kill
them) and stops them afterwards; ``bench.harness.servers`` does the work, so the benchmark runs
the very same servers.  A missing binary is an error, not a skip: CI installs them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bench.harness.servers import MooncakeServers, RedisClusterServers, RedisServer
from kvtier.config import BreakerConfig, MooncakeConfig, RedisConfig

# Fast breaker for tests: open after 2 failures, probe again after 0.2 s (then 0.4, 0.8, ...).
TEST_BREAKER = BreakerConfig(failure_threshold=2, base_backoff_s=0.2, max_backoff_s=1.0)


def unique_prefix() -> str:
    """A key prefix no other test uses, so each tier starts empty on a shared server."""
    return f"kvt-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_standalone() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers(3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mooncake_servers() -> Iterator[MooncakeServers]:
    with MooncakeServers() as servers:
        yield servers


def redis_config(server: RedisServer | RedisClusterServers, **kw: object) -> RedisConfig:
    base: dict[str, object] = dict(url=server.url, cluster=isinstance(server, RedisClusterServers),
                                   password=server.password, key_prefix=unique_prefix(), breaker=TEST_BREAKER)
    base.update(kw)
    return RedisConfig(**base)  # type: ignore[arg-type]


def mooncake_config(servers: MooncakeServers, **kw: object) -> MooncakeConfig:
    base: dict[str, object] = dict(master_address=servers.master_address, metadata_server=servers.metadata_server,
                                   global_segment_size=0, local_buffer_size=16 << 20, staging_bytes=16 << 20,
                                   key_prefix=unique_prefix(), breaker=TEST_BREAKER)
    base.update(kw)
    return MooncakeConfig(**base)  # type: ignore[arg-type]
