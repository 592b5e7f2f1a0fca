from __future__ import annotations

import numpy as np
import pytest

from kvtier.codec import HEADER_BYTES, decode_chunk_into, encode_chunk
from kvtier.errors import ChunkFormatError, CorruptChunkError, ForeignLayoutError, LayoutError, TruncatedChunkError
from kvtier.keys import ChunkKey
from tests.conftest import forged_chunk

KEY = ChunkKey(bytes(range(16)))
FP = 0x1234_5678_9ABC_DEF0
PAYLOAD = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8)


def _decode(data: bytes, key: ChunkKey = KEY, fp: int = FP) -> np.ndarray:
    out = np.zeros(4096, np.uint8)
    decode_chunk_into(data, out, key=key, layout_fingerprint=fp, chunk_bytes=4096)
    return out


def test_roundtrip() -> None:
    data = encode_chunk(KEY, FP, PAYLOAD)
    assert len(data) == HEADER_BYTES + PAYLOAD.nbytes and data[:4] == b"KVTC"
    np.testing.assert_array_equal(_decode(data), PAYLOAD)


@pytest.mark.parametrize("pos", [0, 5, 9, 20, 33, 41, 57, HEADER_BYTES, HEADER_BYTES + 4095])
def test_any_flipped_bit_is_detected(pos: int) -> None:
    data = bytearray(encode_chunk(KEY, FP, PAYLOAD))
    data[pos] ^= 0x04
    with pytest.raises(ChunkFormatError):
        _decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 100, HEADER_BYTES + 4095])
def test_truncation_is_detected(cut: int) -> None:
    data = encode_chunk(KEY, FP, PAYLOAD)[:cut]
    with pytest.raises(TruncatedChunkError):
        _decode(data)


def test_foreign_layout_and_wrong_key() -> None:
    data = encode_chunk(KEY, FP, PAYLOAD)
    with pytest.raises(ForeignLayoutError, match="different model"):
        _decode(data, fp=FP + 1)
    with pytest.raises(CorruptChunkError, match="expected"):
        _decode(data, key=ChunkKey(bytes(16)))
    with pytest.raises(CorruptChunkError, match="trailing"):
        _decode(data + b"x")


def test_a_pickle_is_not_a_chunk() -> None:
    import pickle

    with pytest.raises(CorruptChunkError, match="magic"):
        _decode(pickle.dumps({"a": 1}) + bytes(200))


@pytest.mark.parametrize("length", [0, 1, 4095, 4097, 8192])
def test_a_payload_of_another_length_is_refused_and_the_buffer_untouched(length: int) -> None:
    """Checksums are not a MAC: a header may promise any length.  Only chunk_bytes is servable."""
    data = forged_chunk(KEY, FP, bytes(range(256)) * (length // 256) + bytes(length % 256))
    out = np.full(4096, 7, np.uint8)
    with pytest.raises(CorruptChunkError, match="payload bytes"):
        decode_chunk_into(data, out, key=KEY, layout_fingerprint=FP, chunk_bytes=4096)
    assert (out == 7).all()


@pytest.mark.parametrize("field", ["flags", "reserved"])
def test_non_zero_reserved_header_fields_are_refused(field: str) -> None:
    data = forged_chunk(KEY, FP, PAYLOAD.tobytes(), **{field: 1})
    with pytest.raises(CorruptChunkError, match="reserved"):
        _decode(data)


def test_an_output_buffer_too_small_is_the_callers_error() -> None:
    with pytest.raises(LayoutError, match="too small"):
        decode_chunk_into(encode_chunk(KEY, FP, PAYLOAD), np.zeros(100, np.uint8), key=KEY,
                          layout_fingerprint=FP, chunk_bytes=4096)
