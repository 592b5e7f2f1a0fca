from __future__ import annotations

import numpy as np
import pytest

from kvtier.codec import HEADER_BYTES, decode_chunk_into, encode_chunk
from kvtier.errors import ChunkFormatError, CorruptChunkError, ForeignLayoutError, TruncatedChunkError
from kvtier.keys import ChunkKey

KEY = ChunkKey(bytes(range(16)))
FP = 0x1234_5678_9ABC_DEF0
PAYLOAD = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8)


def _decode(data: bytes, key: ChunkKey = KEY, fp: int = FP) -> np.ndarray:
    out = np.zeros(4096, np.uint8)
    decode_chunk_into(data, out, key=key, layout_fingerprint=fp)
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
