"""Helpers for the vLLM integration tests: a tiny random-weight model, built offline.

No model hub: ``build_tiny_model`` writes a Qwen2-shaped model with random weights (and no
tokenizer; tests pass ``prompt_token_ids`` with ``skip_tokenizer_init=True``) into a directory.
The weights are drawn with a fixed seed and a large init range so greedy decoding has clear
winners (no near-ties that would make the comparison with recompute flaky).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness.models import build_random_model
from bench.harness.vllm_runner import VllmRunFailed, run_in_subprocess

__all__ = ["VllmRunFailed", "build_tiny_model", "run_vllm"]

TINY = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 512, "vocab_size": 2048}


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 with head_dim 64 (supported by the CPU attention backend), ~2 MB."""
    return build_random_model(path, seed=seed, **TINY)



def run_vllm(spec: dict[str, Any], workdir: Path, name: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``spec`` with ``bench.harness.vllm_runner`` in a fresh process (see there)."""
    return run_in_subprocess(spec, workdir, name, timeout=timeout)
