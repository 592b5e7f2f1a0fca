"""Checks behind the config dataclasses: every field's type, then its rule, at construction.

A config dataclass calls ``validate(self)`` in ``__post_init__``.  For each field it checks the
value against the field's annotation (``int`` refuses ``1.5``, ``"4"`` and ``True``; a size refuses
negatives), normalises the harmless cases (a list of tier names becomes a tuple, a ``str`` path a
``Path``, a numpy integer an ``int``), then runs the field's rule from its metadata (``_rule`` in
``kvtier.config.schema``): a function from the value to a problem (``"must be positive"``) or ``None``.
A problem is a ``ConfigFieldError`` naming ``Class.field`` and the bad value; ``load_config``
re-labels it with the path in the file or the environment variable that set it.

Secrets (a password) are never echoed: a field marked secret reports only the type of a bad value,
and URLs are shown with their password replaced by ``***``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, unquote, urlsplit

from kvtier.errors import ConfigFieldError

MAX_SIZE = (1 << 63) - 1  # sizes travel through C and numpy as int64

Check = Callable[[Any], "str | None"]


class ByteSize(int):
    """An int that config parsing reads from ``"2GiB"``-style strings."""


# --- the type of every field ---------------------------------------------------------------------

def validate(obj: Any) -> None:
    """Check and normalise every field of config dataclass ``obj`` (called by its ``__post_init__``)."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        where = f"{type(obj).__name__}.{f.name}"
        value = getattr(obj, f.name)
        typed = _typed(hints[f.name], value, where, secret=f.metadata.get("secret", False))
        if typed is not value:
            object.__setattr__(obj, f.name, typed)
        check = f.metadata.get("check")
        if check is not None and typed is not None and (problem := check(typed)) is not None:
            if f.metadata.get("secret"):
                raise ConfigFieldError(where, problem)  # never echo a secret
            shown = redact_url(typed) if f.metadata.get("url") else typed
            raise ConfigFieldError(where, f"{problem}, got {shown!r}")


def _typed(tp: Any, value: Any, where: str, *, secret: bool = False) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _typed(inner, value, where, secret=secret)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        raise _wrong(where, f"a {tp.__name__}", value)  # type: ignore[union-attr]
    if origin is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise ConfigFieldError(where, f"{value!r} is not one of {list(get_args(tp))}")
    if origin is tuple:
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
            return tuple(value) if isinstance(value, list) else value
        raise _wrong(where, "a list of strings", value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(where, "true or false", value)
    if tp in (int, ByteSize):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise _wrong(where, "a size in bytes" if tp is ByteSize else "an integer", value)
        if tp is ByteSize and (problem := size_problem(int(value))) is not None:
            raise ConfigFieldError(where, f"{problem}, got {value!r}")
        return value if type(value) is tp else tp(value)
    if tp is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _wrong(where, "a number", value)
        return float(value)  # a float as it is; an int or a numpy number as a plain float
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(where, "a string", value, secret=secret)
    if tp is Path:
        if isinstance(value, str | os.PathLike) and os.fspath(value) != "":
            return value if isinstance(value, Path) else Path(os.path.expanduser(os.fspath(value)))
        raise _wrong(where, "a path", value)
    return value


def _wrong(where: str, expected: str, value: Any, *, secret: bool = False) -> ConfigFieldError:
    shown = type(value).__name__ if secret else repr(value)
    return ConfigFieldError(where, f"expected {expected}, got {shown}")


# --- rules: value -> problem or None --------------------------------------------------------------

def size_problem(size: int) -> str | None:
    if size < 0:
        return "a size cannot be negative"
    return "a size must be below 2**63 bytes" if size > MAX_SIZE else None


def positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be positive"


def at_least(low: int, high: int | None = None) -> Check:
    def check(value: int) -> str | None:
        if value < low:
            return f"must be at least {low}"
        return None if high is None or value <= high else f"must be at most {high}"
    return check


def nonempty(text: str) -> str | None:
    return "must not be empty" if not text.strip() else None


def readable_file(path: str) -> str | None:
    if not os.path.isfile(path):
        return "no such file" if not os.path.exists(path) else "is not a file"
    return None if os.access(path, os.R_OK) else "is not readable"


def _has_space(text: str) -> bool:
    return any(c.isspace() or not c.isprintable() for c in text)


def hostname(text: str) -> str | None:
    return "must be a host name or address" if not text or _has_space(text) else None


def host_port(text: str) -> str | None:
    host, _, port = text.rpartition(":")
    if not host or _has_space(text) or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be host:port"
    return None


def key_prefix(text: str) -> str | None:
    return "must be non-empty, without spaces" if not text or _has_space(text) else None


def metadata_server(text: str) -> str | None:
    """Mooncake's metadata service: ``P2PHANDSHAKE``, ``host:port`` (etcd) or a URL."""
    scheme, sep, rest = text.partition("://")
    if not text or _has_space(text) or (sep and (scheme not in ("http", "https", "etcd", "redis") or not rest)):
        return "must be P2PHANDSHAKE, host:port or an http(s)://, etcd:// or redis:// URL"
    return None


# --- URLs ---------------------------------------------------------------------------------------

def _netloc(url: str) -> tuple[str, str, str]:
    """(``scheme://``, netloc, rest) as ``urlsplit`` cuts them; ("", "", url) without a scheme."""
    scheme, sep, tail = url.partition("://")
    if not sep:
        return "", "", url
    end = min((i for i in (tail.find(c) for c in "/?#") if i >= 0), default=len(tail))
    return scheme + sep, tail[:end], tail[end:]


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    head, netloc, rest = _netloc(url)
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{head}{userinfo.partition(':')[0]}:***@{host}{rest}"


def split_url_password(url: str) -> tuple[str, str | None]:
    """(``url`` without its password, the password) -- the password ``None`` if it has none."""
    head, netloc, rest = _netloc(url)
    userinfo, at, host = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return url, None
    return f"{head}{user + '@' if user else ''}{host}{rest}", unquote(password)


def check_redis_url(url: str, *, cluster: bool) -> str | None:
    """The problem with a Redis URL, or None; redis-py reads the same parts the same way."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        return "must start with redis://, rediss:// or unix://"
    if _has_space(url):
        return "has spaces or control characters"
    parts = urlsplit(url)
    if "password" in parse_qs(parts.query):
        return "carries a password in its query string: set redis.password instead"
    if scheme == "unix":
        if cluster:
            return "a Redis Cluster is reached by redis:// or rediss://, not a unix socket"
        return None if parts.path else "names no socket path"
    try:
        port = parts.port
    except ValueError:
        return "has a bad port"
    if not parts.hostname or port == 0:
        return "names no host" if not parts.hostname else "has a bad port"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"has a bad database number {db!r}"
    if cluster and db not in ("", "0"):
        return "a Redis Cluster has only database 0"
    return None
