from __future__ import annotations

import numpy as np
import pytest

from kvtier.errors import LayoutError
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
