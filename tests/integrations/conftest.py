"""Fixtures of the engine-integration tests: a tiny random-weight model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integrations.vllm_helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))
