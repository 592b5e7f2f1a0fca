"""The ``[node]`` config section: where ``kvtier serve`` listens, and how long a client waits for it.

An engine process uses the node's shared DRAM pool by naming the ``node`` tier where ``dram`` was
(``tiers = ["node", "disk"]``, or ``KVTIER_TIERS=node,disk``); ``node.url`` says which service.
Every field is checked like the others (``kvtier.config_checks``): ``node.url: must be unix:///an
/absolute/path, got 'tcp://x'``.  See docs/node.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.config_checks import positive, validate

SCHEME = "unix://"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its terminating NUL


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/kvtier/kvtier.sock`` (a per-user tmpfs), else ``/tmp/kvtier-<uid>/kvtier.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "kvtier" if runtime else Path(f"/tmp/kvtier-{os.getuid()}")
    return base / "kvtier.sock"


def default_url() -> str:
    return SCHEME + str(default_socket_path())


def socket_path(url: str) -> Path:
    """The socket file of a ``unix:///path`` URL (a bare absolute path is taken as is)."""
    return Path(url[len(SCHEME):] if url.startswith(SCHEME) else url)


def url_problem(url: str) -> str | None:
    """Why ``url`` names no usable Unix socket, or None."""
    if not url.startswith((SCHEME, "/")):
        return f"must be {SCHEME}/an/absolute/path (the socket `kvtier serve --socket` listens on)"
    path = str(socket_path(url))
    if not path.startswith("/") or path.endswith("/"):
        return f"must be {SCHEME}/an/absolute/path to a socket file"
    if len(path.encode()) > MAX_SOCKET_PATH:
        return f"the socket path is {len(path.encode())} bytes; a Unix socket path has at most {MAX_SOCKET_PATH}"
    return None


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """A client of ``kvtier serve`` (the ``node`` tier): never an error into the engine, only misses."""

    url: str = field(default_factory=default_url, metadata={"check": url_problem})
    # the most one tier call waits on the service (lock, connect, replies); then it is a counted miss
    deadline_s: float = field(default=0.1, metadata={"check": positive})
    # after the service failed or refused, calls are misses at once for this long before a reconnect
    retry_s: float = field(default=1.0, metadata={"check": positive})

    def __post_init__(self) -> None:
        validate(self)
