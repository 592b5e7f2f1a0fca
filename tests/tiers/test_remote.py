"""RemoteTier's shared bookkeeping, on a server that is a dict (the real servers: test_redis, test_mooncake)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from kvtier.codec import decode_chunk_into, encode_chunk
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.remote import RemoteTier, under_deadline
from tests.conftest import make_keys, make_payloads

log = logging.getLogger(__name__)


class _DictTier(RemoteTier):
    name = "dict"
    what = "Dict"

    def __init__(self, layout: KVLayout, capacity: int) -> None:
        super().__init__(layout, key_prefix="t", capacity=capacity, deadline_s=5.0)
        self.server: dict[str, bytes] = {}
        self.sent: list[str] = []
        self.deadlines: list[object] = []  # the call deadline each delete_many ran under

    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        ok = [False] * len(keys)
        for i in self._within_budget(keys, payloads):
            self.sent.append(self.remote_name(keys[i]))
            self.server[self.remote_name(keys[i])] = encode_chunk(keys[i], self.layout.fingerprint, payloads[i])
            ok[i] = True
        self._found([k for k, good in zip(keys, ok, strict=True) if good], 0, written=True)
        return ok

    @under_deadline
    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        ok, corrupt = [False] * len(keys), []
        for i, key in enumerate(keys):
            value = self.server.get(self.remote_name(key))
            if value is None:
                self._gone([key])
                continue
            try:
                decode_chunk_into(value, outs[i], key=key, layout_fingerprint=self.layout.fingerprint,
                                  chunk_bytes=self.layout.chunk_bytes)
            except ChunkFormatError as exc:
                self._corrupt(key, exc, log)
                corrupt.append(key)
                continue
            ok[i] = True
        self._drop_corrupt(corrupt)
        return ok

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.remote_name(k) in self.server for k in keys]

    @under_deadline
    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self.deadlines.append(self._call_deadline())
        self._gone(keys)
        return [self.server.pop(self.remote_name(k), None) is not None for k in keys]


def test_names_round_trip_and_foreign_names_are_no_chunks(small_layout: KVLayout) -> None:
    tier = _DictTier(small_layout, 1 << 20)
    key = make_keys(small_layout, 1)[0]
    assert tier.remote_name(key) == f"t:{small_layout.fingerprint:016x}:{key.hex()}"
    assert tier.chunk_key(tier.remote_name(key)) == key
    assert tier.chunk_key(f"t:{0:016x}:{key.hex()}") is None  # another layout
    assert tier.chunk_key(tier.remote_name(key)[:-2]) is None  # not a whole key
    assert tier.chunk_key(tier.remote_name(key)[:-1] + "z") is None


def test_the_budget_refuses_new_chunks_only(small_layout: KVLayout) -> None:
    tier = _DictTier(small_layout, 2 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    assert tier.put_many(keys, payloads) == [True, True, False]  # nothing sent for the third
    assert len(tier.sent) == 2 and tier.used_bytes == 2 * small_layout.chunk_bytes
    assert tier.put_many(keys[:2], payloads[:2]) == [True, True]  # known chunks are always sent
    assert sorted(tier.keys()) == sorted(keys[:2])


def test_a_corrupt_chunk_is_counted_deleted_and_a_miss_under_the_get_deadline(small_layout: KVLayout) -> None:
    tier = _DictTier(small_layout, 1 << 20)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    tier.put_many(keys, payloads)
    name = tier.remote_name(keys[1])
    tier.server[name] = tier.server[name][:-1] + bytes([tier.server[name][-1] ^ 0xFF])
    outs = [np.empty(small_layout.chunk_bytes, np.uint8) for _ in keys]
    assert tier.get_many_into(keys, outs) == [True, False]
    assert tier.stats.corrupt == 1 and name not in tier.server and list(tier.keys()) == [keys[0]]
    assert len(tier.deadlines) == 1 and tier.deadlines[0] is not None  # the delete ran under the get's deadline
    assert tier._call_deadline() is None  # and it ended with the call
    np.testing.assert_array_equal(outs[0], payloads[0])
