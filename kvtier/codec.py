"""The chunk format: a fixed 64-byte header, then the raw payload.  No pickle, ever.

Header (little-endian, 64 bytes)::

    offset size field
     0      4   magic             b"KVTC"
     4      2   format version    1
     6      2   flags             0 (reserved: a reader refuses any other value)
     8      8   layout fingerprint (KVLayout.fingerprint)
    16     16   chunk key
    32      8   payload length in bytes
    40      8   payload checksum  xxh3_64 of the payload
    48      8   reserved          0 (a reader refuses any other value)
    56      8   header checksum   xxh3_64 of bytes 0..55

Everything that leaves process memory (disk files, Redis values, Mooncake objects) is encoded
this way, so a reader can tell a torn write (TruncatedChunkError), bit rot (CorruptChunkError)
and a chunk of another model (ForeignLayoutError) apart from a good chunk before serving it.
A reader also knows how long a payload must be (its layout's ``chunk_bytes``): a header that
promises any other length is refused, however good its checksums (they are not a MAC), so a
short chunk can never leave stale bytes in the caller's buffer.  Non-zero flags or reserved
fields are refused too: they are the room a later format version has to say something new.
DRAM slots hold bare payloads: they never leave the process, and checksumming there would cost
more than the copy itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from kvtier.errors import CorruptChunkError, ForeignLayoutError, LayoutError, TruncatedChunkError
from kvtier.keys import KEY_BYTES, ChunkKey

MAGIC = b"KVTC"
VERSION = 1
HEADER = struct.Struct("<4sHHQ16sQQQ")  # 56 bytes, then the 8-byte header checksum
HEADER_BYTES = HEADER.size + 8
assert HEADER_BYTES == 64


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    layout_fingerprint: int
    key: ChunkKey
    payload_len: int
    payload_checksum: int


def payload_checksum(payload: np.ndarray | memoryview | bytes) -> int:
    data = payload.data if isinstance(payload, np.ndarray) else payload
    return xxhash.xxh3_64_intdigest(data)


def encode_header(key: ChunkKey, layout_fingerprint: int, payload: np.ndarray | memoryview | bytes,
                  checksum: int | None = None) -> bytes:
    """The 64-byte header for ``payload``; write it followed by the payload bytes."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"chunk key must be {KEY_BYTES} bytes")
    nbytes = payload.nbytes if isinstance(payload, np.ndarray | memoryview) else len(payload)
    if checksum is None:
        checksum = payload_checksum(payload)
    head = HEADER.pack(MAGIC, VERSION, 0, layout_fingerprint, key, nbytes, checksum, 0)
    return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")


def encode_chunk(key: ChunkKey, layout_fingerprint: int, payload: np.ndarray | bytes) -> bytes:
    """Header + payload as one bytes object (for stores that take a single value)."""
    data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
    return encode_header(key, layout_fingerprint, data) + data


def decode_header(data: bytes | memoryview, *, key: ChunkKey | None, layout_fingerprint: int,
                  chunk_bytes: int) -> ChunkHeader:
    """Parse and validate a header; ``key=None`` skips the key check (used by disk scans).

    ``chunk_bytes`` is the only payload length the reader accepts (its layout's).
    """
    if len(data) < HEADER_BYTES:
        raise TruncatedChunkError(f"chunk header needs {HEADER_BYTES} bytes, got {len(data)}")
    head = bytes(data[:HEADER.size])
    magic, version, flags, fp, stored_key, nbytes, checksum, reserved = HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptChunkError(f"bad magic {magic!r}: not a kvtier chunk")
    if int.from_bytes(data[HEADER.size:HEADER_BYTES], "little") != xxhash.xxh3_64_intdigest(head):
        raise CorruptChunkError("header checksum mismatch")
    if version != VERSION:
        raise CorruptChunkError(f"chunk format version {version} is not supported (this kvtier reads {VERSION})")
    if flags or reserved:
        raise CorruptChunkError(f"chunk header has flags={flags:#x}, reserved={reserved:#x}: this kvtier "
                                "reads only 0 there (a newer format?)")
    if fp != layout_fingerprint:
        raise ForeignLayoutError(
            f"chunk was written for layout fingerprint {fp:016x}, this store expects "
            f"{layout_fingerprint:016x}: a different model, shape, dtype or chunk size")
    if key is not None and stored_key != key:
        raise CorruptChunkError(f"chunk holds key {stored_key.hex()}, expected {key.hex()}")
    if nbytes != chunk_bytes:
        raise CorruptChunkError(f"chunk header says {nbytes} payload bytes, this layout's chunks have {chunk_bytes}")
    return ChunkHeader(fp, ChunkKey(stored_key), nbytes, checksum)


def verify_payload(header: ChunkHeader, payload: np.ndarray | memoryview | bytes) -> None:
    nbytes = payload.nbytes if isinstance(payload, np.ndarray | memoryview) else len(payload)
    if nbytes < header.payload_len:
        raise TruncatedChunkError(f"payload has {nbytes} of {header.payload_len} bytes")
    if payload_checksum(payload) != header.payload_checksum:
        raise CorruptChunkError("payload checksum mismatch")


def decode_chunk_into(data: bytes | memoryview, out: np.ndarray, *, key: ChunkKey,
                      layout_fingerprint: int, chunk_bytes: int) -> int:
    """Validate an encoded chunk and copy its payload into ``out``; returns the payload length.

    ``out`` must hold ``chunk_bytes`` (LayoutError otherwise: a caller's bug, not bad data);
    it is written only once the whole chunk has been validated.
    """
    if out.nbytes < chunk_bytes:
        raise LayoutError(f"output buffer of {out.nbytes} bytes is too small for a {chunk_bytes}-byte chunk")
    header = decode_header(data, key=key, layout_fingerprint=layout_fingerprint, chunk_bytes=chunk_bytes)
    end = HEADER_BYTES + header.payload_len
    if len(data) < end:
        raise TruncatedChunkError(f"chunk has {len(data) - HEADER_BYTES} of {header.payload_len} payload bytes")
    if len(data) > end:
        raise CorruptChunkError(f"chunk has {len(data) - end} trailing bytes")
    body = np.frombuffer(data, dtype=np.uint8, count=header.payload_len, offset=HEADER_BYTES)
    verify_payload(header, body)
    out[:header.payload_len] = body
    return header.payload_len
