"""Helpers for the vLLM integration tests: a tiny random-weight model, built offline.

No model hub: ``build_tiny_model`` writes a Qwen2-shaped model with random weights (and no
tokenizer; tests pass ``prompt_token_ids`` with ``skip_tokenizer_init=True``) into a directory.
The weights are drawn with a fixed seed and a large init range so greedy decoding has clear
winners (no near-ties that would make the comparison with recompute flaky).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvtier.integrations.vllm_models import build_random_model

TINY = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 512, "vocab_size": 2048}


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 with head_dim 64 (supported by the CPU attention backend), ~2 MB."""
    return build_random_model(path, seed=seed, **TINY)


def run_vllm(spec: dict[str, Any], workdir: Path, name: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``kvtier.integrations.vllm_runner`` on ``spec`` in a fresh process; its JSON result.

    Raises ``VllmRunFailed`` (with the process output) if the engine fails.
    """
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "kvtier.integrations.vllm_runner", str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise VllmRunFailed(proc.stdout + proc.stderr)
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


class VllmRunFailed(RuntimeError):
    """The vLLM process exited with an error; ``str(exc)`` holds its output."""
