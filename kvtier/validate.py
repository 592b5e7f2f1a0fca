"""Checks of what callers hand the public API (``ContextMemory``): bad input fails at the call.

Each check returns its argument as the hierarchy uses it (a list: any iterable is accepted, a
generator too) or raises a ``KVTierError`` that is also the ``TypeError`` / ``ValueError`` Python
callers expect, naming the argument, the position and the bad value.  Nothing is stored, read or
reserved before every argument passed: a bad call changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import numpy as np

from kvtier.errors import ArgumentTypeError, ArgumentValueError, LayoutError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout

__all__ = ["buffers_arg", "chunk_keys_arg", "count_arg", "payloads_arg", "ttl_arg"]


def _show(value: object) -> str:
    """A short description of a bad value: its type and a clipped repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 43 else text}"


def _as_list(values: object, name: str, what: str) -> list[object]:
    if isinstance(values, bytes | bytearray | memoryview | str) or not isinstance(values, Iterable):
        raise ArgumentTypeError(f"{name}: expected an iterable of {what}, got {_show(values)}")
    return list(values)


def chunk_keys_arg(keys: object, name: str = "keys") -> list[ChunkKey]:
    """``keys`` as a list of 16-byte chunk keys."""
    got = _as_list(keys, name, f"{KEY_BYTES}-byte chunk keys")
    if set(map(type, got)) <= {bytes} and set(map(len, cast("list[bytes]", got))) <= {KEY_BYTES}:  # common case, in C
        return got  # type: ignore[return-value]
    for i, key in enumerate(got):
        if not isinstance(key, bytes):
            raise ArgumentTypeError(f"{name}[{i}]: expected a {KEY_BYTES}-byte chunk key (bytes), got {_show(key)}")
        if len(key) != KEY_BYTES:
            raise ArgumentValueError(f"{name}[{i}]: a chunk key has {KEY_BYTES} bytes, got {len(key)}")
    return got  # type: ignore[return-value]


def _chunk_arrays(values: list[object], name: str, layout: KVLayout, *, writable: bool) -> list[np.ndarray]:
    """``values`` if each is a chunk buffer.  Each distinct object is checked once (a caller may pass
    one scratch buffer for every chunk), and a message is built only on failure."""
    size = layout.chunk_bytes
    for value in {id(v): v for v in values}.values():
        if (type(value) is np.ndarray and value.dtype == np.uint8 and value.ndim == 1 and value.nbytes == size
                and value.flags.c_contiguous and (value.flags.writeable or not writable)):
            continue  # the common case, kept cheap
        i = next(j for j, v in enumerate(values) if v is value)
        want = f"a 1-D contiguous uint8 numpy array of {size} bytes"
        where = f"{name}[{i}]"
        if not isinstance(value, np.ndarray):
            raise ArgumentTypeError(f"{where}: expected {want}, got {_show(value)}")
        if value.dtype != np.uint8 or value.ndim != 1 or not value.flags.c_contiguous:
            raise LayoutError(f"{where}: expected {want}, got dtype={value.dtype}, shape={value.shape}"
                              + ("" if value.flags.c_contiguous else ", not contiguous"))
        if value.nbytes != size:
            raise LayoutError(f"{where}: has {value.nbytes} bytes, layout {layout.describe()} needs {size}")
        if writable and not value.flags.writeable:
            raise ArgumentValueError(f"{where}: the buffer is read-only")
    return values  # type: ignore[return-value]


def payloads_arg(payloads: object, num_keys: int, layout: KVLayout, name: str = "payloads") -> list[np.ndarray]:
    """One chunk payload per key, each exactly ``layout.chunk_bytes`` of uint8."""
    got = _as_list(payloads, name, "numpy uint8 arrays")
    if len(got) != num_keys:
        raise ArgumentValueError(f"{name}: {len(got)} payloads for {num_keys} keys (one per key)")
    return _chunk_arrays(got, name, layout, writable=False)


def buffers_arg(outs: object, num_keys: int, layout: KVLayout, name: str = "outs") -> list[np.ndarray]:
    """At least one writable ``layout.chunk_bytes`` uint8 buffer per key (extra ones are unused)."""
    got = _as_list(outs, name, "numpy uint8 arrays")
    if len(got) < num_keys:
        raise ArgumentValueError(f"{name}: {len(got)} buffers for {num_keys} keys (one per key)")
    return _chunk_arrays(got[:num_keys], name, layout, writable=True)


def ttl_arg(ttl_s: object, name: str = "ttl_s") -> float | None:
    """None (no expiry) or a finite number of seconds > 0."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
        raise ArgumentTypeError(f"{name}: expected seconds (a number) or None, got {_show(ttl_s)}")
    if not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ArgumentValueError(f"{name}: must be a finite number of seconds > 0, got {ttl_s!r}")
    return float(ttl_s)


def count_arg(value: object, name: str, *, upper: int) -> int:
    """An int in ``[0, upper]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ArgumentTypeError(f"{name}: expected an int, got {_show(value)}")
    if not 0 <= value <= upper:
        raise ArgumentValueError(f"{name}: must be in [0, {upper}], got {value}")
    return int(value)
