from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvtier.errors import KeyingError
from kvtier.keys import KEY_BYTES, chunk_keys, namespace_key
from kvtier.layout import KVLayout

LAYOUT = KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=8)
NS = namespace_key(LAYOUT)


def test_only_full_chunks_get_keys() -> None:
    assert len(chunk_keys(np.arange(7), tokens_per_chunk=8, namespace=NS)) == 0
    assert len(chunk_keys(np.arange(8), tokens_per_chunk=8, namespace=NS)) == 1
    assert len(chunk_keys(np.arange(8 * 5 + 7), tokens_per_chunk=8, namespace=NS)) == 5
    assert all(len(k) == KEY_BYTES for k in chunk_keys(np.arange(64), tokens_per_chunk=8, namespace=NS))


def test_keys_are_prefix_chained() -> None:
    a = chunk_keys(np.arange(32), tokens_per_chunk=8, namespace=NS)
    b = np.arange(32)
    b[3] = 999  # change the first chunk only
    kb = chunk_keys(b, tokens_per_chunk=8, namespace=NS)
    assert all(x != y for x, y in zip(a, kb, strict=True))  # every later key depends on the prefix
    c = np.arange(32)
    c[30] = 999
    kc = chunk_keys(c, tokens_per_chunk=8, namespace=NS)
    assert kc[:3] == a[:3] and kc[3] != a[3]


def test_incremental_extension_matches_full() -> None:
    tokens = np.arange(80)
    full = chunk_keys(tokens, tokens_per_chunk=8, namespace=NS)
    head = chunk_keys(tokens[:40], tokens_per_chunk=8, namespace=NS)
    tail = chunk_keys(tokens, tokens_per_chunk=8, namespace=NS, start=40, parent=head[-1])
    assert head + tail == full


def test_namespace_separates_tenants_and_models() -> None:
    tokens = np.arange(16)
    other_model = KVLayout(model="m2", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=8)
    keysets = [chunk_keys(tokens, tokens_per_chunk=8, namespace=ns) for ns in
               (NS, namespace_key(LAYOUT, "tenant-a"), namespace_key(LAYOUT, "tenant-b"), namespace_key(other_model))]
    flat = [k for ks in keysets for k in ks]
    assert len(set(flat)) == len(flat)


def test_keys_are_stable_across_processes() -> None:
    """Same tokens, same key in another interpreter (no PYTHONHASHSEED dependence)."""
    code = ("import numpy as np; from kvtier.keys import chunk_keys, namespace_key; from kvtier.layout import KVLayout;"
            "L=KVLayout(model='m', num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=8);"
            "print(chunk_keys(np.arange(16), tokens_per_chunk=8, namespace=namespace_key(L))[1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == chunk_keys(np.arange(16), tokens_per_chunk=8, namespace=NS)[1].hex()


def test_lists_and_arrays_agree_and_bad_ids_are_refused() -> None:
    assert chunk_keys(list(range(16)), tokens_per_chunk=8, namespace=NS) == chunk_keys(
        np.arange(16, dtype=np.int64), tokens_per_chunk=8, namespace=NS)
    with pytest.raises(ValueError):
        chunk_keys([-1] * 8, tokens_per_chunk=8, namespace=NS)


@pytest.mark.parametrize(("tokens", "text"), [
    ([1.0] * 8, "must be integers, got float64"),
    ([1.7] * 8, "must be integers, got float64"),
    (np.arange(8, dtype=np.float32), "got float32"),
    ([1] * 7 + [2.5], "got float64"),
    ([True] * 8, "got bool"),
    (["1"] * 8, "must be integers"),
    ([None] * 8, "must be integers"),
    ([1, 2**70] + [0] * 6, "must be integers"),
    ([2**31] * 8, "in [0, 2**31)"),
    ([-1] * 8, "in [0, 2**31)"),
    (np.array([2**40] * 8, dtype=np.uint64), "in [0, 2**31)"),
    ([[1] * 8], "1-D"),
    (5, "1-D"),
    ((t for t in range(8)), "1-D"),
    ([[1, 2], [3]], "1-D sequence of integers"),
])
def test_token_ids_that_are_not_integers_are_refused(tokens: object, text: str) -> None:
    with pytest.raises(KeyingError) as info:
        chunk_keys(tokens, tokens_per_chunk=8, namespace=NS)  # type: ignore[arg-type]
    assert text in str(info.value) and "\n" not in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"tokens_per_chunk": 0}, "tokens_per_chunk must be a positive integer"),
    ({"tokens_per_chunk": 8.0}, "tokens_per_chunk must be a positive integer, got 8.0"),
    ({"start": 3}, "start must be a non-negative multiple of tokens_per_chunk=8, got 3"),
    ({"start": -8}, "got -8"),
    ({"start": 8.0}, "got 8.0"),
    ({"namespace": b"short"}, "namespace must be a 16-byte ChunkKey"),
    ({"namespace": "0" * 16}, "namespace must be a 16-byte ChunkKey"),
    ({"parent": b"\0" * 15}, "parent must be a 16-byte ChunkKey"),
    ({"extras": lambda i: "image"}, "extras(0) must return bytes, got str"),
])
def test_bad_chain_arguments_are_refused(kwargs: dict[str, object], text: str) -> None:
    args: dict[str, object] = {"tokens_per_chunk": 8, "namespace": NS, **kwargs}
    with pytest.raises(KeyingError) as info:
        chunk_keys(np.arange(16), **args)  # type: ignore[arg-type]
    assert text in str(info.value)


def test_integer_ids_of_any_width_agree_and_empty_is_fine() -> None:
    ref = chunk_keys(np.arange(16), tokens_per_chunk=8, namespace=NS)
    for dtype in (np.int32, np.uint16, np.uint32, np.int64, np.uint64):
        assert chunk_keys(np.arange(16, dtype=dtype), tokens_per_chunk=8, namespace=NS) == ref
    assert chunk_keys([], tokens_per_chunk=8, namespace=NS) == []
    assert chunk_keys(np.arange(16), tokens_per_chunk=np.int64(8), namespace=NS) == ref  # type: ignore[arg-type]


def test_a_keyed_namespace_cannot_be_computed_from_the_tenant_name() -> None:
    """The name salt is public: anyone can rebuild "team-a"'s keys.  With a secret the seed is an
    HMAC: the name alone (or another secret) gives other keys; the same secret, the same keys."""
    tokens = np.arange(16)
    by_name = chunk_keys(tokens, tokens_per_chunk=8, namespace=namespace_key(LAYOUT, "team-a"))
    keyed = chunk_keys(tokens, tokens_per_chunk=8, namespace=namespace_key(LAYOUT, "team-a", secret=b"k1"))
    again = chunk_keys(tokens, tokens_per_chunk=8, namespace=namespace_key(LAYOUT, "team-a", secret=b"k1"))
    other = chunk_keys(tokens, tokens_per_chunk=8, namespace=namespace_key(LAYOUT, "team-a", secret=b"k2"))
    other_name = chunk_keys(tokens, tokens_per_chunk=8, namespace=namespace_key(LAYOUT, "team-b", secret=b"k1"))
    assert keyed == again
    assert len({k for ks in (by_name, keyed, other, other_name) for k in ks}) == 8
    assert len(namespace_key(LAYOUT, "team-a", secret=b"k1")) == KEY_BYTES
    with pytest.raises(KeyingError, match="non-empty bytes"):
        namespace_key(LAYOUT, "team-a", secret=b"")
