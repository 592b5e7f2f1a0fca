"""Chunk keys: chained prefix hashes of fixed-size token chunks.

A token sequence is cut into chunks of ``tokens_per_chunk`` ids.  Chunk ``i``'s key is::

    key[-1] = xxh3_128("kvtier-ns-v1" | layout fingerprint | tenant salt)     # the namespace
    key[i]  = xxh3_128(key[i-1] || token_ids[i*C:(i+1)*C] as little-endian int32)

so a key names a whole prefix, not just a chunk's own tokens: equal keys mean equal prefixes
(up to a 128-bit collision), and two tenants or two models never share a chunk.  xxh3 is
deterministic across processes, machines and Python versions (unlike ``hash()``).

A chunk whose KV depends on more than its tokens (an image behind placeholder tokens) takes an
*extra*, appended after the fixed-size token bytes: ``key[i] = xxh3_128(key[i-1] || tokens ||
extra[i])``.  An empty extra hashes exactly as no extra, so keys without extras are unchanged; a
non-empty one should itself be a digest (fixed length), so no two extras can run together.

The last partial chunk (fewer than C tokens) gets no key: it is never stored and always
recomputed, so at most C-1 tokens per request are recomputed on a full hit.  Storing partial
chunks would need a key per length and rewrites as the chunk fills; engines (vLLM, SGLang) make
the same choice for their own block hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NewType

import numpy as np
import xxhash

from kvtier.errors import ArgumentTypeError, ArgumentValueError
from kvtier.layout import KVLayout

ChunkKey = NewType("ChunkKey", bytes)
"""16 bytes; ``key.hex()`` names it in files and remote stores."""

KEY_BYTES = 16


def namespace_key(layout: KVLayout, tenant: str = "") -> ChunkKey:
    """The chain's seed: binds every key to one model/layout and one tenant."""
    seed = f"kvtier-ns-v1|{layout.fingerprint:016x}|{tenant}".encode()
    return ChunkKey(xxhash.xxh3_128_digest(seed))


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int32 bytes, the form that is hashed.

    Only integers: a float id (2.7) is refused, never truncated into another prompt's key.
    """
    try:
        arr = np.asarray(token_ids)
    except (ValueError, TypeError) as exc:  # ragged nesting, objects numpy cannot make an array of
        raise ArgumentTypeError(f"token_ids: must be a 1-D sequence of ints ({exc})") from exc
    if arr.ndim != 1:
        raise ArgumentValueError(f"token_ids: must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"token_ids: must be integers, got dtype {arr.dtype} "
                                f"(first value {arr[0]!r})")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise ArgumentValueError(f"token_ids: must be in [0, 2**31), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype("<i4", copy=False).tobytes()


def chunk_keys(token_ids: Sequence[int] | np.ndarray, *, tokens_per_chunk: int,
               namespace: ChunkKey, start: int = 0, parent: ChunkKey | None = None,
               extras: Callable[[int], bytes] | None = None) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``token_ids``.

    ``parent`` and ``start`` extend an existing chain: pass the key of the last chunk already
    hashed and the index of the first token not yet hashed (a multiple of tokens_per_chunk), so
    a growing conversation hashes each chunk once.  ``extras(i)`` is folded into the key of the
    chunk of ``token_ids[i*C:(i+1)*C]`` (see the module docstring); ``b""`` adds nothing.
    """
    if start % tokens_per_chunk:
        raise ValueError("start must be a multiple of tokens_per_chunk")
    data = memoryview(token_bytes(token_ids))
    step = 4 * tokens_per_chunk
    prev = bytes(parent if parent is not None else namespace)
    keys: list[ChunkKey] = []
    digest = xxhash.xxh3_128_digest
    for off in range(4 * start, len(data) - step + 1, step):
        extra = extras(off // step) if extras is not None else b""
        prev = digest(prev + data[off:off + step].tobytes() + extra)
        keys.append(ChunkKey(prev))
    return keys
