"""The conformance suite every tier passes, built-in or out of tree (``register_tier``).

A tier's test module subclasses ``TierConformance`` and provides a ``tier`` fixture: a fresh, empty
tier of the ``layout`` fixture's layout (by default ``small_layout()``: 1 KiB chunks), with room for
at least 8 chunks, closed after the test::

    import pytest
    from kvtier.testing import TierConformance

    class TestMyTier(TierConformance):
        @pytest.fixture
        def tier(self, layout):
            tier = MyTier(layout, capacity=1 << 20)
            yield tier
            tier.close()

It checks the contract of ``kvtier.tiers.base.Tier``: round trips, misses that leave the buffer
alone, delete, ``keys()``, usage accounting (an overwrite is not counted twice), batch calls equal
to single ones, a wrong-length payload refused with a clear error, ``borrow``, and concurrent puts
and gets.  Needs pytest (not a dependency of kvtier itself).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvtier.errors import LayoutError
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier


def small_layout() -> KVLayout:
    """A tiny layout: 2 layers x K/V x 4 tokens x 2 heads x 8 dims of float32 = 1 KiB a chunk."""
    return KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                    tokens_per_chunk=4)


def make_keys(layout: KVLayout, n: int, seed: int = 0, tenant: str = "") -> list[ChunkKey]:
    """``n`` distinct chunk keys of ``layout`` (random tokens from ``seed``)."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, size=n * layout.tokens_per_chunk)
    return chunk_keys(tokens, tokens_per_chunk=layout.tokens_per_chunk, namespace=namespace_key(layout, tenant))


def make_payloads(layout: KVLayout, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random payloads of ``layout.chunk_bytes`` bytes."""
    rng = np.random.default_rng(seed + 1000)
    return [rng.integers(0, 256, size=layout.chunk_bytes, dtype=np.uint8) for _ in range(n)]


class TierConformance:
    """Subclass it in a test module and give it a ``tier`` fixture (see the module doc)."""

    @pytest.fixture
    def layout(self) -> KVLayout:
        return small_layout()

    def _buf(self, layout: KVLayout) -> np.ndarray:
        return np.zeros(layout.chunk_bytes, dtype=np.uint8)

    def test_put_get_roundtrip(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 3), make_payloads(layout, 3)
        for k, p in zip(keys, payloads, strict=True):
            assert tier.put(k, p)
        for k, p in zip(keys, payloads, strict=True):
            out = self._buf(layout)
            assert tier.get_into(k, out)
            np.testing.assert_array_equal(out, p)

    def test_miss_leaves_buffer_alone(self, tier: Tier, layout: KVLayout) -> None:
        (key,) = make_keys(layout, 1, seed=7)
        out = np.full(layout.chunk_bytes, 0xAB, dtype=np.uint8)
        assert not tier.get_into(key, out)
        assert not tier.contains(key)
        assert (out == 0xAB).all()

    def test_contains_and_delete(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 2), make_payloads(layout, 2)
        tier.put(keys[0], payloads[0])
        assert tier.contains(keys[0]) and not tier.contains(keys[1])
        assert tier.delete(keys[0])
        assert not tier.contains(keys[0])
        assert not tier.delete(keys[0])
        assert not tier.get_into(keys[0], self._buf(layout))

    def test_keys_iterates_what_was_put(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 4), make_payloads(layout, 4)
        tier.put_many(keys, payloads)
        assert set(keys) <= set(tier.keys())
        tier.delete(keys[1])
        assert keys[1] not in set(tier.keys())

    def test_usage_accounting(self, tier: Tier, layout: KVLayout) -> None:
        before = tier.used_bytes
        keys, payloads = make_keys(layout, 3), make_payloads(layout, 3)
        tier.put_many(keys, payloads)
        assert tier.used_bytes == before + 3 * layout.chunk_bytes
        tier.put(keys[0], payloads[0])  # overwrite of the same key: no double count
        assert tier.used_bytes == before + 3 * layout.chunk_bytes
        tier.delete(keys[0])
        assert tier.used_bytes == before + 2 * layout.chunk_bytes
        assert tier.capacity_bytes >= tier.used_bytes

    def test_batch_variants_match_single(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 6), make_payloads(layout, 6)
        assert tier.put_many(keys[:5], payloads[:5]) == [True] * 5
        assert tier.contains_many(keys) == [True] * 5 + [False]
        outs = [self._buf(layout) for _ in keys]
        assert tier.get_many_into(keys, outs) == [True] * 5 + [False]
        for o, p in zip(outs[:5], payloads[:5], strict=True):
            np.testing.assert_array_equal(o, p)
        assert tier.delete_many(keys[:2]) == [True, True]
        assert tier.contains_many(keys[:3]) == [False, False, True]

    def test_wrong_payload_size_is_a_clear_error(self, tier: Tier, layout: KVLayout) -> None:
        (key,) = make_keys(layout, 1)
        with pytest.raises(LayoutError, match="bytes"):
            tier.put(key, np.zeros(layout.chunk_bytes + 1, dtype=np.uint8))
        assert not tier.contains(key)

    def test_borrow_gives_the_bytes(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 1), make_payloads(layout, 1)
        tier.put(keys[0], payloads[0])
        with tier.borrow(keys[0]) as view:
            assert view is not None
            np.testing.assert_array_equal(view, payloads[0])
        with tier.borrow(make_keys(layout, 1, seed=9)[0]) as view:
            assert view is None

    def test_concurrent_puts_and_gets(self, tier: Tier, layout: KVLayout) -> None:
        keys, payloads = make_keys(layout, 8, seed=3), make_payloads(layout, 8, seed=3)
        errors: list[BaseException] = []

        def worker(lo: int) -> None:
            try:
                for i in range(lo, 8, 2):
                    assert tier.put(keys[i], payloads[i])
                    out = self._buf(layout)
                    assert tier.get_into(keys[i], out)
                    np.testing.assert_array_equal(out, payloads[i])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(lo,)) for lo in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
