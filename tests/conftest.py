"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout


@pytest.fixture
def small_layout() -> KVLayout:
    """A tiny layout: 2 layers x K/V x 4 tokens x 2 heads x 8 dims of float32 = 1 KiB a chunk."""
    return KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                    tokens_per_chunk=4)


def make_keys(layout: KVLayout, n: int, seed: int = 0, tenant: str = "") -> list[ChunkKey]:
    tokens = np.random.default_rng(seed).integers(0, 50_000, size=n * layout.tokens_per_chunk)
    return chunk_keys(tokens, tokens_per_chunk=layout.tokens_per_chunk, namespace=namespace_key(layout, tenant))


def make_payloads(layout: KVLayout, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    return [rng.integers(0, 256, size=layout.chunk_bytes, dtype=np.uint8) for _ in range(n)]


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt a stored chunk file in place: invert the byte at ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
