"""Property tests of ContextMemory's public API with arbitrary arguments: every call either does
its job (and then loads return exactly the bytes stored) or raises a KVTierError, never another
exception, and a refused call changes nothing."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvtier.errors import KVTierError
from kvtier.hierarchy import ContextMemory
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads

LAYOUT = KVLayout(model="test/tiny", num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", tokens_per_chunk=2)
CB = LAYOUT.chunk_bytes
KEYS = make_keys(LAYOUT, 6)
PAYLOADS = make_payloads(LAYOUT, 6)
WANT = dict(zip(KEYS, PAYLOADS, strict=True))

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=20),
                 st.binary(max_size=24), st.lists(st.integers(0, 300), max_size=4),
                 hnp.arrays(st.sampled_from([np.uint8, np.int8, np.float32, np.int64]),
                            st.sampled_from([(0,), (CB - 1,), (CB,), (CB // 4,), (2, CB // 2), (CB + 1,)])))
key_items = st.one_of(st.sampled_from(KEYS), junk, st.binary(min_size=16, max_size=16))
payload_items = st.one_of(st.sampled_from(PAYLOADS), junk, st.builds(lambda: np.zeros(CB, np.uint8)))
key_lists = st.one_of(st.lists(key_items, max_size=5), st.lists(st.sampled_from(KEYS), max_size=5), junk)
payload_lists = st.one_of(st.lists(payload_items, max_size=5), junk)


@contextmanager
def _memory() -> Iterator[ContextMemory]:
    with tempfile.TemporaryDirectory() as tmp:
        tiers = [DramTier(LAYOUT, capacity_bytes=3 * CB, prefault=False),
                 DiskTier(LAYOUT, path=Path(tmp), capacity_bytes=5 * CB, fsync=False)]
        with ContextMemory(LAYOUT, tiers) as mem:  # type: ignore[arg-type]
            yield mem


def _held(mem: ContextMemory) -> set[bytes]:
    mem.flush()
    assert mem.directory.settled()
    return {k for ix in mem.indexes for k in ix.sizes}


@given(keys=key_lists, payloads=payload_lists)
def test_store_any_arguments(keys: object, payloads: object) -> None:
    with _memory() as mem:
        try:
            n = mem.store(keys, payloads)  # type: ignore[arg-type]
        except KVTierError:
            assert _held(mem) == set()
            return
        stored = dict[bytes, np.ndarray]()
        for key, payload in zip(keys, payloads, strict=True):  # type: ignore[call-overload]
            stored.setdefault(key, payload)  # a repeated key keeps its first payload
        assert n == len(stored)
        for key, payload in stored.items():
            out = np.zeros(CB, np.uint8)
            assert mem.load([key], [out]) == 1 and (out == payload).all()


@given(keys=key_lists, outs=payload_lists)
def test_load_any_arguments(keys: object, outs: object) -> None:
    with _memory() as mem:
        mem.store(KEYS[:4], PAYLOADS[:4])  # 3 in DRAM, 1 demoted to disk, all written through
        before = _held(mem)
        try:
            n = mem.load(keys, outs)  # type: ignore[arg-type]
        except KVTierError:
            assert _held(mem) == before
            return
        for i in range(n):
            assert (outs[i] == WANT[keys[i]]).all()  # type: ignore[index]
        assert n == len(keys) or keys[n] not in before  # type: ignore[arg-type, index]


@given(keys=key_lists)
def test_lookup_delete_borrow_any_keys(keys: object) -> None:
    with _memory() as mem:
        mem.store(KEYS[:3], PAYLOADS[:3])
        try:
            hit = mem.lookup(keys)  # type: ignore[arg-type]
            with mem.borrow_prefix(keys) as views:  # type: ignore[arg-type]
                assert all((v == WANT[k]).all() for k, v in zip(keys, views, strict=False))  # type: ignore[call-overload]
            mem.delete(keys)  # type: ignore[arg-type]
        except KVTierError:
            assert _held(mem) == set(KEYS[:3])
            return
        assert hit.num_chunks <= len(keys)  # type: ignore[arg-type]
        assert _held(mem) == set(KEYS[:3]) - set(keys)  # type: ignore[arg-type]


@given(keys=key_lists, ttl=st.one_of(st.none(), junk), persist=st.one_of(st.booleans(), junk))
def test_pin_any_arguments(keys: object, ttl: object, persist: object) -> None:
    with _memory() as mem:
        try:
            mem.pin(keys, ttl, persist=persist)  # type: ignore[arg-type]
        except KVTierError:
            assert not any(mem.pinned(k) for k in KEYS)
            return
        assert all(mem.pinned(k) for k in keys)  # type: ignore[attr-defined]
        mem.unpin(keys)  # type: ignore[arg-type]
        assert not any(mem.pinned(k) for k in KEYS)


@given(tokens=st.one_of(junk, st.lists(st.one_of(st.integers(-2, 2**32), st.floats(), st.text(max_size=2)),
                                       max_size=9),
                        hnp.arrays(st.sampled_from([np.int32, np.int64, np.uint8, np.float64, np.bool_]),
                                   st.integers(0, 9))))
def test_keys_for_any_tokens(tokens: object) -> None:
    with _memory() as mem:
        try:
            keys = mem.keys_for(tokens)  # type: ignore[arg-type]
        except KVTierError:
            return
        ids = np.asarray(tokens)
        assert ids.dtype.kind in "iu" or ids.size == 0
        assert len(keys) == ids.size // LAYOUT.tokens_per_chunk
