from __future__ import annotations

import numpy as np
import pytest

from kvtier.errors import KVTierError, LayoutError, LayoutTypeError
from kvtier.layout import DEEPSEEK_V3, LLAMA_3_1_8B, QWEN2_5_0_5B, KVLayout


def test_llama_8b_sizes() -> None:
    assert LLAMA_3_1_8B.bytes_per_token == 128 * 1024
    assert LLAMA_3_1_8B.chunk_bytes == 32 * 1024 * 1024
    assert LLAMA_3_1_8B.layer_bytes * LLAMA_3_1_8B.num_layers == LLAMA_3_1_8B.chunk_bytes


def test_mla_fits_the_same_abstraction() -> None:
    assert DEEPSEEK_V3.num_kv_parts == 1
    assert DEEPSEEK_V3.bytes_per_token == 61 * 576 * 2
    assert DEEPSEEK_V3.chunk_shape == (61, 1, 256, 1, 576)


def test_payload_byte_order_is_layer_major() -> None:
    layout = KVLayout(model="t", num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", tokens_per_chunk=5)
    kv = np.arange(np.prod(layout.chunk_shape), dtype=np.float32).reshape(layout.chunk_shape)
    payload = kv.reshape(-1).view(np.uint8)
    layer1 = payload[layout.layer_bytes:2 * layout.layer_bytes].view(np.float32).reshape(layout.chunk_shape[1:])
    np.testing.assert_array_equal(layer1, kv[1])


def test_fingerprint_distinguishes_everything_that_matters() -> None:
    base = dict(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", tokens_per_chunk=16)
    fps = {KVLayout(**base).fingerprint}  # type: ignore[arg-type]
    for field, value in [("model", "m2"), ("num_layers", 3), ("num_kv_heads", 4), ("head_dim", 16),
                         ("dtype", "float16"), ("tokens_per_chunk", 32)]:
        fps.add(KVLayout(**{**base, field: value}).fingerprint)  # type: ignore[arg-type]
    assert len(fps) == 7
    assert QWEN2_5_0_5B.fingerprint == KVLayout(model="Qwen/Qwen2.5-0.5B", num_layers=24, num_kv_heads=2,
                                                head_dim=64).fingerprint


def test_invalid_layouts_are_clear_errors() -> None:
    with pytest.raises(LayoutError, match="dtype"):
        KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=1, dtype="float64")
    with pytest.raises(LayoutError, match="num_layers"):
        KVLayout(model="m", num_layers=0, num_kv_heads=1, head_dim=1)
    layout = KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=2)
    with pytest.raises(LayoutError, match="needs 32"):
        layout.check_payload(np.zeros(15, np.uint8))
    with pytest.raises(LayoutError, match="uint8"):
        layout.check_payload(np.zeros(4, np.float32))


GOOD = dict(model="m", num_layers=2, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize(("change", "error", "text"), [
    ({"num_layers": "4"}, LayoutTypeError, "KVLayout.num_layers must be an integer, got '4'"),
    ({"head_dim": 2.5}, LayoutTypeError, "KVLayout.head_dim must be an integer, got 2.5"),
    ({"head_dim": 8.0}, LayoutTypeError, "got 8.0"),
    ({"num_kv_heads": True}, LayoutTypeError, "KVLayout.num_kv_heads must be an integer, got True"),
    ({"tokens_per_chunk": None}, LayoutTypeError, "KVLayout.tokens_per_chunk"),
    ({"num_kv_parts": True}, LayoutTypeError, "KVLayout.num_kv_parts"),
    ({"num_layers": 0}, LayoutError, "KVLayout.num_layers must be positive, got 0"),
    ({"num_kv_heads": -2}, LayoutError, "KVLayout.num_kv_heads must be positive, got -2"),
    ({"head_dim": 0}, LayoutError, "KVLayout.head_dim"),
    ({"tokens_per_chunk": -256}, LayoutError, "KVLayout.tokens_per_chunk"),
    ({"num_kv_parts": 3}, LayoutError, "num_kv_parts must be 1 (MLA) or 2"),
    ({"dtype": "float64"}, LayoutError, "unsupported dtype 'float64'"),
    ({"dtype": "bf16"}, LayoutError, "unsupported dtype 'bf16'"),
    ({"dtype": ["bfloat16"]}, LayoutTypeError, "KVLayout.dtype must be a dtype name"),
    ({"dtype": np.float16}, LayoutTypeError, "KVLayout.dtype"),
    ({"model": ""}, LayoutTypeError, "KVLayout.model must be a non-empty string"),
    ({"model": None}, LayoutTypeError, "KVLayout.model"),
    ({"num_layers": 10**9, "head_dim": 10**6}, LayoutError, "over the 1 TiB limit"),
])
def test_bad_layouts_name_the_field(change: dict[str, object], error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        KVLayout(**{**GOOD, **change})  # type: ignore[arg-type]
    assert isinstance(info.value, KVTierError) and text in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, TypeError if error is LayoutTypeError else ValueError)


def test_numpy_integers_are_plain_ints() -> None:
    layout = KVLayout(**{**GOOD, "num_layers": np.int64(2)})  # type: ignore[arg-type]
    assert type(layout.num_layers) is int and layout == KVLayout(**GOOD)  # type: ignore[arg-type]
    assert layout.fingerprint == KVLayout(**GOOD).fingerprint  # type: ignore[arg-type]
    assert isinstance(layout.chunk_bytes, int)


@pytest.mark.parametrize("payload", [b"\0" * 32, bytearray(32), [0] * 32, None, memoryview(b"\0" * 32)])
def test_payloads_that_are_not_arrays_are_layout_errors(payload: object) -> None:
    layout = KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=2)
    with pytest.raises(LayoutTypeError, match="numpy uint8 array"):
        layout.check_payload(payload)  # type: ignore[arg-type]
