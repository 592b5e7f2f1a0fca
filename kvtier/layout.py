"""KVLayout: the shape of one model's KV cache, and the byte order of a chunk payload.

A chunk payload holds every layer's KV for ``tokens_per_chunk`` consecutive tokens, as one
contiguous C-order array of shape::

    (num_layers, num_kv_parts, tokens_per_chunk, num_kv_heads, head_dim)   dtype = layout.dtype

``num_kv_parts`` is 2 for ordinary attention (part 0 = K, part 1 = V) and 1 for MLA models
(DeepSeek-V2/V3), whose cache holds a single compressed latent per token and layer
(``num_kv_heads=1``, ``head_dim = kv_lora_rank + qk_rope_head_dim``, 512 + 64 = 576 for V3).

Layer-major order is deliberate: layer ``l`` occupies the contiguous byte range
``[l * layer_bytes, (l + 1) * layer_bytes)``, so a layer-wise loader can copy layer ``l`` to the
GPU (and let layer ``l`` compute) before later layers have arrived.  Bytes are little-endian, the
native order of every GPU and CPU kvtier targets.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import xxhash

from kvtier.errors import LayoutError, LayoutTypeError

# Bytes per element of each supported dtype name (torch spelling).
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

# 1 TiB: far above any real chunk (Llama-3.1-70B in bf16: 80 MiB per 256 tokens); a larger layout
# is a typo or an overflow, refused here rather than by numpy or the codec later.
MAX_CHUNK_BYTES = 1 << 40
_INT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "tokens_per_chunk", "num_kv_parts")


@dataclass(frozen=True, slots=True, kw_only=True)
class KVLayout:
    """The KV cache shape of one model, independent of any engine's paging."""

    model: str  # identifies the weights; two models never share chunks even with equal shapes
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"  # torch dtype name, a key of DTYPE_SIZES
    tokens_per_chunk: int = 256
    num_kv_parts: int = 2  # 2 = separate K and V; 1 = one MLA latent per token and layer

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise LayoutTypeError(f"KVLayout.model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.dtype, str):
            raise LayoutTypeError(f"KVLayout.dtype must be a dtype name, one of {sorted(DTYPE_SIZES)}; "
                                  f"got {self.dtype!r}")
        if self.dtype not in DTYPE_SIZES:
            raise LayoutError(f"unsupported dtype {self.dtype!r}; use one of {sorted(DTYPE_SIZES)}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise LayoutTypeError(f"KVLayout.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer: the fingerprint and sizes want an int
            if value <= 0:
                raise LayoutError(f"KVLayout.{name} must be positive, got {value}")
        if self.num_kv_parts not in (1, 2):
            raise LayoutError(f"num_kv_parts must be 1 (MLA) or 2 (K and V), got {self.num_kv_parts}")
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            raise LayoutError(f"KVLayout of {self.chunk_bytes} bytes per chunk is over the 1 TiB limit "
                              f"({self.describe()})")

    @classmethod
    def mla(cls, *, model: str, num_layers: int, latent_dim: int, dtype: str = "bfloat16",
            tokens_per_chunk: int = 256) -> KVLayout:
        """An MLA layout: one latent vector of ``latent_dim`` per token and layer."""
        return cls(model=model, num_layers=num_layers, num_kv_heads=1, head_dim=latent_dim,
                   dtype=dtype, tokens_per_chunk=tokens_per_chunk, num_kv_parts=1)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers (128 KiB for Llama-3.1-8B in bf16)."""
        return self.num_layers * self.num_kv_parts * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's slice of a full chunk (contiguous in the payload)."""
        return self.num_kv_parts * self.tokens_per_chunk * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Payload bytes of one full chunk."""
        return self.bytes_per_token * self.tokens_per_chunk

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        """(num_layers, num_kv_parts, tokens_per_chunk, num_kv_heads, head_dim)."""
        return (self.num_layers, self.num_kv_parts, self.tokens_per_chunk, self.num_kv_heads, self.head_dim)

    @property
    def fingerprint(self) -> int:
        """A 64-bit id of model + shape + dtype + chunking, stored in every chunk header."""
        text = (f"kvtier-layout-v1|{self.model}|{self.num_layers}|{self.num_kv_parts}|"
                f"{self.num_kv_heads}|{self.head_dim}|{self.dtype}|{self.tokens_per_chunk}")
        return xxhash.xxh3_64_intdigest(text.encode())

    def describe(self) -> str:
        return (f"{self.model} ({self.num_layers} layers x {self.num_kv_parts} parts x "
                f"{self.num_kv_heads} heads x {self.head_dim} dim, {self.dtype}, "
                f"{self.tokens_per_chunk} tokens/chunk)")

    def check_payload(self, payload: np.ndarray) -> None:
        """Raise LayoutError unless ``payload`` is a contiguous uint8 array of one chunk."""
        if not isinstance(payload, np.ndarray):
            raise LayoutTypeError(f"a chunk payload must be a numpy uint8 array, got {type(payload).__name__}")
        if payload.dtype != np.uint8 or payload.ndim != 1 or not payload.flags.c_contiguous:
            raise LayoutError("a chunk payload must be a 1-D contiguous uint8 array "
                              f"(got dtype={payload.dtype}, shape={payload.shape})")
        if payload.nbytes != self.chunk_bytes:
            raise LayoutError(f"payload is {payload.nbytes} bytes, layout {self.describe()} "
                              f"needs {self.chunk_bytes}")


# Shapes used by benchmarks and the simulator (public configs; no weights needed).
LLAMA_3_1_8B = KVLayout(model="meta-llama/Llama-3.1-8B", num_layers=32, num_kv_heads=8, head_dim=128)
LLAMA_3_1_70B = KVLayout(model="meta-llama/Llama-3.1-70B", num_layers=80, num_kv_heads=8, head_dim=128)
QWEN2_5_7B = KVLayout(model="Qwen/Qwen2.5-7B", num_layers=28, num_kv_heads=4, head_dim=128)
QWEN2_5_0_5B = KVLayout(model="Qwen/Qwen2.5-0.5B", num_layers=24, num_kv_heads=2, head_dim=64)
DEEPSEEK_V3 = KVLayout.mla(model="deepseek-ai/DeepSeek-V3", num_layers=61, latent_dim=576)

KNOWN_LAYOUTS: dict[str, KVLayout] = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "llama-3.1-70b": LLAMA_3_1_70B,
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "deepseek-v3": DEEPSEEK_V3,
}
