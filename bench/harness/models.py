"""Random-weight models for tests, benchmarks and the demo (no model hub, no downloads).

``build_random_model`` writes a Qwen2-shaped ``config.json`` + ``model.safetensors`` with
transformers' ``save_pretrained``; vLLM loads it like any local checkpoint (pass
``skip_tokenizer_init=True`` and token ids: there is no tokenizer).  ``QWEN2_5_0_5B`` is the
shape of Qwen/Qwen2.5-0.5B (24 layers, 2 KV heads of 64 dims), used by ``kvtier bench vllm``;
``SMALL`` (8 layers, 8 KiB of KV per token in fp32) and ``TINY`` (2 layers) are the shapes its
concurrent mode replays agent sessions on, sized for a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QWEN2_5_0_5B: dict[str, Any] = {
    "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
    "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
}
SMALL: dict[str, Any] = {  # head_dim 64: what vLLM's CPU attention backend supports
    "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 8,
    "intermediate_size": 1536, "vocab_size": 8192,
}
TINY: dict[str, Any] = {
    "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "intermediate_size": 512, "vocab_size": 2048,
}
SHAPES: dict[str, dict[str, Any]] = {"qwen2.5-0.5b": QWEN2_5_0_5B, "small": SMALL, "tiny": TINY}


def kv_bytes_per_token(shape: dict[str, Any], dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return int(shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim * dtype_bytes)


def build_random_model(path: str | Path, *, seed: int = 0, max_position_embeddings: int = 32768,
                       initializer_range: float = 0.2, **shape: Any) -> Path:
    """Write a random-weight Qwen2 model of the given shape into ``path``; returns ``path``.

    Idempotent: if ``path/config.json`` exists it is reused.  ``initializer_range`` is large on
    purpose: logits of a random model with the usual 0.02 are nearly flat, so greedy decoding
    would hinge on float rounding; 0.2 gives clear winners.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(path)
    if (out / "config.json").exists():
        return out
    config = Qwen2Config(max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                         **shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
