"""Chunk keys: chained prefix hashes of fixed-size token chunks.

A token sequence is cut into chunks of ``tokens_per_chunk`` ids.  Chunk ``i``'s key is::

    key[-1] = xxh3_128("kvtier-ns-v1" | layout fingerprint | tenant salt)     # the namespace
            (keyed: the first 16 bytes of HMAC-SHA256(tenant secret, the same text))
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

Tenants.  The tenant *name* salt separates tenants' caches against accidents (two teams'
identical prompts never share a chunk), but it is no secret: whoever knows the name "team-a" can
compute team-a's keys with these public functions and load its chunks.  A *keyed* namespace
(``secret``: ``tenant_secret`` / ``tenant_secret_file`` in the config) is an HMAC under a secret:
without the secret another tenant cannot compute a single one of your keys.  Neither encrypts
anything: the chunk bytes on disk and in Redis are plain KV tensors, readable by whoever can read
the store itself (file permissions, Redis ACLs are what guard those).
"""

from __future__ import annotations

import hashlib
import hmac
import numbers
from collections.abc import Callable, Sequence
from typing import NewType

import numpy as np
import xxhash

from kvtier.errors import KeyingError, KeyingTypeError
from kvtier.layout import KVLayout

ChunkKey = NewType("ChunkKey", bytes)
"""16 bytes; ``key.hex()`` names it in files and remote stores."""

KEY_BYTES = 16


def namespace_key(layout: KVLayout, tenant: str = "", *, secret: bytes | None = None) -> ChunkKey:
    """The chain's seed: binds every key to one model/layout and one tenant.

    ``secret``: the tenant's secret; the seed is then an HMAC that nobody without the secret can
    compute (module docstring).  ``None`` keeps the plain, name-only seed.
    """
    seed = f"kvtier-ns-v1|{layout.fingerprint:016x}|{tenant}".encode()
    if secret is not None:
        if not isinstance(secret, bytes) or not secret:
            raise KeyingError("a tenant secret must be non-empty bytes")
        return ChunkKey(hmac.new(secret, seed, hashlib.sha256).digest()[:KEY_BYTES])
    return ChunkKey(xxhash.xxh3_128_digest(seed))


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int32 bytes, the form that is hashed.

    Ids must be integers in [0, 2**31): a float id (``3.0`` or ``3.7``) is refused, never truncated,
    since a silently changed id would name another prefix.
    """
    try:
        arr = np.asarray(token_ids)
    except (TypeError, ValueError, OverflowError) as exc:  # ragged nesting, objects numpy cannot hold
        raise KeyingTypeError(f"token_ids must be a 1-D sequence of integers ({exc})") from None
    if arr.ndim != 1:
        raise KeyingError(f"token_ids must be a 1-D sequence of integers, got shape {arr.shape} "
                          f"of {type(token_ids).__name__}")
    if not arr.size:
        return b""
    if arr.dtype.kind not in "iu":
        raise KeyingTypeError(f"token_ids must be integers, got {arr.dtype} ids (first: {arr[0]!r})")
    if arr.min() < 0 or arr.max() >= 2**31:
        raise KeyingError(f"token_ids must be in [0, 2**31), got ids in [{arr.min()}, {arr.max()}]")
    return arr.astype("<i4", copy=False).tobytes()


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_key(name: str, key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise KeyingError(f"{name} must be a {KEY_BYTES}-byte ChunkKey, got {key!r}")
    return key


def chunk_keys(token_ids: Sequence[int] | np.ndarray, *, tokens_per_chunk: int,
               namespace: ChunkKey, start: int = 0, parent: ChunkKey | None = None,
               extras: Callable[[int], bytes] | None = None) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``token_ids``.

    ``parent`` and ``start`` extend an existing chain: pass the key of the last chunk already
    hashed and the index of the first token not yet hashed (a multiple of tokens_per_chunk), so
    a growing conversation hashes each chunk once.  ``extras(i)`` is folded into the key of the
    chunk of ``token_ids[i*C:(i+1)*C]`` (see the module docstring); ``b""`` adds nothing.
    """
    if not _is_int(tokens_per_chunk) or tokens_per_chunk <= 0:
        raise KeyingError(f"tokens_per_chunk must be a positive integer, got {tokens_per_chunk!r}")
    if not _is_int(start) or start < 0 or start % tokens_per_chunk:
        raise KeyingError(f"start must be a non-negative multiple of tokens_per_chunk={tokens_per_chunk}, "
                          f"got {start!r}")
    prev = _check_key("parent" if parent is not None else "namespace", parent if parent is not None else namespace)
    data = memoryview(token_bytes(token_ids))
    step = 4 * tokens_per_chunk
    keys: list[ChunkKey] = []
    digest = xxhash.xxh3_128_digest
    for off in range(4 * start, len(data) - step + 1, step):
        extra = extras(off // step) if extras is not None else b""
        if not isinstance(extra, bytes):
            raise KeyingError(f"extras({off // step}) must return bytes, got {type(extra).__name__}")
        prev = digest(prev + data[off:off + step].tobytes() + extra)
        keys.append(ChunkKey(prev))
    return keys
