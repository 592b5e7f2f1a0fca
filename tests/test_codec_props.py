"""Property tests of the chunk codec: whatever the bytes, a decode returns exactly the payload
that was encoded, or raises a ChunkFormatError and leaves the caller's buffer alone."""

from __future__ import annotations

import numpy as np
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvtier.codec import HEADER, HEADER_BYTES, MAGIC, VERSION, decode_chunk_into, encode_chunk
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey

CB = 64  # the reader's chunk_bytes
FP = 0x0123_4567_89AB_CDEF
KEY = ChunkKey(bytes(range(16)))
SENTINEL = 0xA5


def _decode(data: bytes) -> tuple[int | None, np.ndarray]:
    """(payload length, buffer) on success, (None, buffer) on ChunkFormatError; anything else fails."""
    out = np.full(CB, SENTINEL, np.uint8)
    try:
        return decode_chunk_into(data, out, key=KEY, layout_fingerprint=FP, chunk_bytes=CB), out
    except ChunkFormatError:
        assert (out == SENTINEL).all(), "a refused chunk wrote into the caller's buffer"
        return None, out


@given(st.binary(max_size=3 * (HEADER_BYTES + CB)))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    n, _ = _decode(data)
    assert n is None  # random bytes never pass the magic and the header checksum


@given(payload=st.binary(min_size=CB, max_size=CB), edits=st.lists(
    st.tuples(st.integers(0, HEADER_BYTES + CB - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_any_edit_of_a_good_chunk_is_refused(payload: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(encode_chunk(KEY, FP, np.frombuffer(payload, np.uint8)))
    for pos, xor in edits:
        data[pos] ^= xor
    n, out = _decode(bytes(data))
    if bytes(data) == encode_chunk(KEY, FP, np.frombuffer(payload, np.uint8)):  # edits cancelled out
        assert n == CB and out.tobytes() == payload
    else:
        assert n is None


@given(payload=st.binary(min_size=CB, max_size=CB), cut=st.integers(0, HEADER_BYTES + CB - 1),
       extra=st.binary(max_size=16))
def test_truncated_or_extended_chunks_are_refused(payload: bytes, cut: int, extra: bytes) -> None:
    good = encode_chunk(KEY, FP, np.frombuffer(payload, np.uint8))
    assert _decode(good[:cut])[0] is None
    if extra:
        assert _decode(good + extra)[0] is None


@given(magic=st.sampled_from([MAGIC, b"KVTD"]), version=st.sampled_from([VERSION, 0, 2, 0xFFFF]),
       flags=st.sampled_from([0, 1, 0x8000]), fp=st.sampled_from([FP, FP ^ 1, 0]),
       key=st.sampled_from([KEY, ChunkKey(bytes(16))]), reserved=st.sampled_from([0, 1, 1 << 63]),
       payload=st.binary(max_size=2 * CB))
def test_forged_headers_with_good_checksums(magic: bytes, version: int, flags: int, fp: int, key: ChunkKey,
                                            reserved: int, payload: bytes) -> None:
    """Checksums are not a MAC: only a header with every field as this reader expects is served,
    and then the bytes are exactly the payload's."""
    head = HEADER.pack(magic, version, flags, fp, key, len(payload), xxhash.xxh3_64_intdigest(payload), reserved)
    data = head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + payload
    n, out = _decode(data)
    servable = (magic, version, flags, fp, key, reserved, len(payload)) == (MAGIC, VERSION, 0, FP, KEY, 0, CB)
    if servable:
        assert n == CB and out.tobytes() == payload
    else:
        assert n is None
