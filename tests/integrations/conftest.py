"""Fixtures of the engine-integration tests: tiny random-weight models, built once per module.

* ``tiny_model``: a tiny Qwen2 checkpoint on disk, for vLLM (session-wide);
* ``model`` and ``layout``: a tiny Llama in memory (once per device: CPU, and CUDA where
  present) and its ``KVLayout``, for the transformers integration (``test_hf*.py``; their helpers
  are in ``hf_helpers.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integrations.vllm_helpers import build_tiny_model


def _devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["cpu"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module", params=_devices())
def model(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip("transformers")
    from tests.integrations.hf_helpers import tiny_llama

    return tiny_llama(request.param)


@pytest.fixture
def layout(model: Any) -> Any:
    from kvtier.integrations.hf import layout_for
    from tests.integrations.hf_helpers import C

    return layout_for(model, tokens_per_chunk=C)
