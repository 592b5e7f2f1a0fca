from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

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
