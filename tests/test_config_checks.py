from __future__ import annotations

import pytest

from kvtier.config_checks import check_redis_url, redact_url, split_url_password


@pytest.mark.parametrize(("url", "shown", "without", "password"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", None),
    ("redis://bob@h:1/0", "redis://bob@h:1/0", "redis://bob@h:1/0", None),
    ("redis://bob:pw@h:1/0", "redis://bob:***@h:1/0", "redis://bob@h:1/0", "pw"),
    ("rediss://:pw@h:1", "rediss://:***@h:1", "rediss://h:1", "pw"),
    ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0", "redis://u@h:1/0", "p@ss"),  # '@' left unquoted
    ("redis://u:p%2Fw@h:1/0?db=1", "redis://u:***@h:1/0?db=1", "redis://u@h:1/0?db=1", "p/w"),
    ("redis://u:pw@[::1]:6379/0", "redis://u:***@[::1]:6379/0", "redis://u@[::1]:6379/0", "pw"),
    ("http://u:pw@h/m", "http://u:***@h/m", "http://u@h/m", "pw"),
    ("P2PHANDSHAKE", "P2PHANDSHAKE", "P2PHANDSHAKE", None),
    ("redis://h/0#u:pw@x", "redis://h/0#u:pw@x", "redis://h/0#u:pw@x", None),  # no userinfo before the path
])
def test_passwords_are_found_where_urlsplit_finds_them(url: str, shown: str, without: str,
                                                       password: str | None) -> None:
    assert redact_url(url) == shown
    assert split_url_password(url) == (without, password)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380", "redis://[::1]:6379/15",
                                 "unix:///run/redis.sock", "redis://h:1/0?socket_keepalive=true"])
def test_good_redis_urls(url: str) -> None:
    assert check_redis_url(url, cluster=False) is None


def test_cluster_urls() -> None:
    assert check_redis_url("redis://h:1/0", cluster=True) is None
    assert check_redis_url("redis://h:1", cluster=True) is None
    assert check_redis_url("redis://h:1/2", cluster=True) == "a Redis Cluster has only database 0"
