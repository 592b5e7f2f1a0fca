"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.testing import make_keys, make_payloads
from kvtier.testing import small_layout as _small_layout

__all__ = ["FakeClock", "make_keys", "make_payloads"]  # make_keys, make_payloads: kvtier.testing's, re-exported

# Property tests run the same examples on every run and machine (no flaky CI), with no per-example
# deadline (a 2-core box shared by several jobs is slow at times); modest counts keep them fast.
settings.register_profile("kvtier", derandomize=True, deadline=None, max_examples=100, print_blob=True)
settings.load_profile("kvtier")


@pytest.fixture
def small_layout() -> KVLayout:
    """A tiny layout: 2 layers x K/V x 4 tokens x 2 heads x 8 dims of float32 = 1 KiB a chunk."""
    return _small_layout()


class FakeClock:
    """A clock the test moves by hand (``clock.now``): for code that takes ``clock=``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt a stored chunk file in place: invert the byte at ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def forged_chunk(key: ChunkKey, fingerprint: int, payload: bytes, *, flags: int = 0, reserved: int = 0,
                 version: int = 1) -> bytes:
    """An encoded chunk with every checksum right but any header fields (checksums are not a MAC:
    anyone can write these).  ``payload`` may have any length; the header states its real length."""
    import xxhash

    from kvtier.codec import HEADER, MAGIC

    head = HEADER.pack(MAGIC, version, flags, fingerprint, key, len(payload),
                       xxhash.xxh3_64_intdigest(payload), reserved)
    return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + payload


# One damaged value per way a chunk can be unservable, for every tier that stores encoded chunks.
FORGERIES = ("short_payload", "long_payload", "flags", "reserved", "version")


def forgery(kind: str, key: ChunkKey, layout: KVLayout, payload: np.ndarray) -> bytes:
    """A value of ``kind`` (one of FORGERIES) for ``key``: well-formed except for that one thing."""
    body = payload.tobytes()
    fp = layout.fingerprint
    return {"short_payload": lambda: forged_chunk(key, fp, body[:-16]),
            "long_payload": lambda: forged_chunk(key, fp, body + bytes(16)),
            "flags": lambda: forged_chunk(key, fp, body, flags=1),
            "reserved": lambda: forged_chunk(key, fp, body, reserved=1),
            "version": lambda: forged_chunk(key, fp, body, version=2)}[kind]()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX (at most 107 bytes), in a fresh directory."""
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="kvn", dir="/tmp"))
    yield where / "node.sock"
    shutil.rmtree(where, ignore_errors=True)
